# A hostile virtio driver: over and over it resets the first virtio-mmio device (a virtio-blk
# disk at 0xd0000000), negotiates VERSION_1, sets up queue 0 with a random size and rings that
# lie in RAM or (one time in four) at random addresses, fills the descriptor table and the avail
# ring with random words (random addresses, lengths up to 4 GiB, random flags and next links, so
# chains loop, run out of RAM, lack a status byte...), sets DRIVER_OK and kicks the queue a few
# times with a running avail index that is sometimes far ahead. 32-bit flat protected mode (PVH
# entry), linked at 1 MiB, its stack below 0x90000. Runs until the host stops it.
.code32
.globl _start
.set BASE, 0xd0000000
.set DESC, 0x200000
.set AVAIL, 0x201000
.set USED, 0x202000
_start:
    mov $0x90000, %esp
    rdtsc
    mov %eax, %ebx                 # xorshift32 state, never 0
    or $1, %ebx
round:
    mov $BASE, %esi
    movl $0, 0x70(%esi)            # status = 0: reset
    movl $3, 0x70(%esi)            # ACKNOWLEDGE | DRIVER
    movl $1, 0x24(%esi)            # DriverFeaturesSel = 1
    movl $1, 0x20(%esi)            # VIRTIO_F_VERSION_1
    movl $0, 0x24(%esi)
    call rand
    and $0x20000204, %eax          # sometimes EVENT_IDX, FLUSH, SEG_MAX
    mov %eax, 0x20(%esi)
    movl $0xb, 0x70(%esi)          # | FEATURES_OK
    movl $0, 0x30(%esi)            # QueueSel = 0
    call rand
    mov %eax, %ecx
    and $0x1ff, %eax               # size 0..511 (256 is the largest valid)
    or $1, %eax
    mov %eax, 0x38(%esi)
    mov $DESC, %eax
    mov $AVAIL, %edx
    mov $USED, %edi
    test $3, %ecx                  # one time in four: random ring addresses
    jnz 1f
    call rand
    mov %eax, %edx
    call rand
    mov %eax, %edi
    call rand
1:
    mov %eax, 0x80(%esi)
    movl $0, 0x84(%esi)
    mov %edx, 0x90(%esi)
    movl $0, 0x94(%esi)
    mov %edi, 0xa0(%esi)
    movl $0, 0xa4(%esi)
    movl $1, 0x44(%esi)            # QueueReady
    # Random descriptor table (256 entries of 16 bytes) and avail ring.
    mov $DESC, %edi
    mov $(256 * 16 / 4), %ecx
2:
    call rand
    mov %eax, (%edi)
    add $4, %edi
    loop 2b
    mov $AVAIL, %edi
    mov $(4 + 2 * 256) / 4, %ecx
3:
    call rand
    and $0x00ff00ff, %eax          # head indices 0..255 (some past a small queue's size)
    mov %eax, (%edi)
    add $4, %edi
    loop 3b
    movl $0xf, 0x70(%esi)          # | DRIVER_OK
    # Kick a few times with a moving avail index (a random jump one time in eight).
    mov $8, %ecx
4:
    call rand
    mov %eax, %edx
    and $7, %edx
    jnz 5f
    mov %ax, AVAIL + 2             # avail idx anywhere
    jmp 6f
5:
    addw $1, AVAIL + 2
6:
    movl $0, 0x50(%esi)            # QueueNotify(0): the ioeventfd
    loop 4b
    jmp round

rand:                              # xorshift32 of %ebx into %eax (and %ebx)
    mov %ebx, %eax
    shl $13, %eax
    xor %eax, %ebx
    mov %ebx, %eax
    shr $17, %eax
    xor %eax, %ebx
    mov %ebx, %eax
    shl $5, %eax
    xor %eax, %ebx
    mov %ebx, %eax
    ret
