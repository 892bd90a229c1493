# The hostile guest on every boot vCPU at once: the BSP copies a real-mode trampoline to 0x10000,
# starts the APs with INIT and two SIPIs (vector 0x10), and every vCPU, the BSP included, runs
# the hostile body (hostile_body.S) with its own TSC-seeded generator. The APs switch to flat
# 32-bit protected mode through their own GDT. Linked at 1 MiB like hostile.S.
.code32
.globl _start
_start:
    mov $trampoline, %esi
    mov $0x10000, %edi
    mov $(trampoline_end - trampoline), %ecx
    cld
    rep movsb
    movl $0x1ff, 0xfee000f0        # spurious-interrupt vector register: APIC software-enabled
    movl $0, 0xfee00310            # ICR high: destination 0 (the shorthand below ignores it)
    movl $0x000c4500, 0xfee00300   # INIT, all excluding self
    mov $200000, %ecx
1:  loop 1b
    movl $0x000c4610, 0xfee00300   # SIPI, vector 0x10: start at 0x10000
    mov $200000, %ecx
2:  loop 2b
    movl $0x000c4610, 0xfee00300   # the second SIPI of the protocol
    jmp hostile

.code16
trampoline:                        # at 0x10000, real mode, CS = 0x1000
    cli
    mov %cs, %ax
    mov %ax, %ds
    lgdtl (gdt_desc - trampoline)
    mov %cr0, %eax
    or $1, %eax
    mov %eax, %cr0
    ljmpl $0x08, $(0x10000 + pm - trampoline)
.code32
pm:
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov $hostile, %eax
    jmp *%eax
.balign 8
gdt:
    .quad 0
    .quad 0x00cf9a000000ffff       # flat 32-bit code
    .quad 0x00cf92000000ffff       # flat data
gdt_desc:
    .word 23
    .long 0x10000 + gdt - trampoline
trampoline_end:

hostile:
.include "hostile_body.S"
