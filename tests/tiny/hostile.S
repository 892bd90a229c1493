# A hostile tiny guest: random-width reads and writes of random values at every port and MMIO
# register minivmm emulates, forever. 32-bit flat protected mode (PVH entry), linked at 1 MiB,
# no stack. Writes to the ACPI sleep port have SLP_EN cleared (no power-off), so the run only
# ends when the host says so. Writes that would reset the machine (0x602 = 1, 0xCF9 bit 2,
# 0xFE to 0x64) are defused except about once in 256, so most boots run long; a reset reboots
# the guest, which seeds its generator from the TSC and so takes a new path each boot.
.code32
.globl _start
_start:
.include "hostile_body.S"
