# The body of the hostile guest (see hostile.S), shared with hostile_smp.S. Needs no stack and no
# memory of its own; it starts at its first instruction.
    rdtsc
    mov %eax, %ebx                 # xorshift32 state, never 0
    or $1, %ebx
next:
    mov %ebx, %eax                 # xorshift32
    shl $13, %eax
    xor %eax, %ebx
    mov %ebx, %eax
    shr $17, %eax
    xor %eax, %ebx
    mov %ebx, %eax
    shl $5, %eax
    xor %eax, %ebx

    mov %ebx, %ecx
    shr $28, %ecx                  # 0..15: what to do
    cmp $12, %ecx
    jae mmio

    # Port access: port from the table by bits 8..11, value from bits 0..7 (and 16..31)
    mov %ebx, %edx
    shr $8, %edx
    and $15, %edx
    movzwl ports(,%edx,2), %edx    # linked at the load address, 1 MiB
    mov %ebx, %eax
    cmp $0x600, %dx                # ACPI sleep control: never SLP_EN
    jne 7f
    and $0xdf, %al
7:  test $0x0ff00000, %ebx         # about 1 in 256: let a reset through
    jz 2f
    cmp $0x602, %dx                # ACPI reset register: never exactly 1
    jne 8f
    or $2, %al
8:  cmp $0xcf9, %dx                # reset control: never the reset bit
    jne 9f
    and $0xfb, %al
9:  cmp $0x64, %dx                 # i8042 command: never pulse reset (0xFE)
    jne 2f
    and $0x7f, %al
2:  test $1, %ecx
    jnz pin
    test $2, %ecx
    jnz 3f
    outb %al, %dx
    jmp next
3:  test $4, %ecx
    jnz 4f
    outw %ax, %dx
    jmp next
4:  outl %eax, %dx
    jmp next
pin:
    test $2, %ecx
    jnz 5f
    inb %dx, %al
    jmp next
5:  test $4, %ecx
    jnz 6f
    inw %dx, %ax
    jmp next
6:  inl %dx, %eax
    jmp next

mmio:
    # Platform MMIO page: GED +0x000, CPU hotplug +0x100, memory hotplug +0x200 (and around).
    mov %ebx, %edi
    shr $4, %edi
    and $0x3ff, %edi
    add $0xfeb00000, %edi
    mov %ebx, %eax
    rol $7, %eax
    cmp $13, %ecx
    je mread
    cmp $14, %ecx
    je mw16
    cmp $15, %ecx
    je mw32
    movb %al, (%edi)
    jmp next
mw16:
    movw %ax, (%edi)
    jmp next
mw32:
    movl %eax, (%edi)
    jmp next
mread:
    movl (%edi), %eax
    movb (%edi), %al
    jmp next

ports:
    .word 0x3f8, 0x3f9, 0x3fa, 0x3fb, 0x3fc, 0x3fd, 0x3ff, 0x70
    .word 0x71, 0x60, 0x64, 0x80, 0x600, 0x601, 0x602, 0xcf9
