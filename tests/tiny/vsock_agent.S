# A tiny vsock agent on the first virtio-mmio device (the vsock device at 0xd0000000 when there
# are no disks), polling, without interrupts. It brings the device up (VERSION_1, an 8-entry RX
# and TX queue), opens a connection to host port 6000 (the host side's signal that the agent is
# up), accepts every connection request from the host, and ignores everything else until a
# data packet arrives, whose first byte says what to do with the connections still open:
#   'r'  reset the device (status 0) and bring it up again, connecting to port 6000 again;
#   'b'  reset the device, then reboot through the ACPI reset register (port 0x602);
#   'p'  reset the device, then power off through ACPI S5 (port 0x600).
# 32-bit flat protected mode (PVH entry), linked at 1 MiB, its stack below 0x90000.
.code32
.globl _start
.set BASE, 0xd0000000
.set RXD, 0x200000             # RX descriptor table, avail ring, used ring
.set RXA, 0x201000
.set RXU, 0x202000
.set TXD, 0x203000             # TX likewise
.set TXA, 0x204000
.set TXU, 0x205000
.set RX_SEEN, 0x205f00         # u16: RX used entries handled
.set RX_AVAIL, 0x205f04        # u16: RX avail index
.set TX_AVAIL, 0x205f08        # u16: TX avail index
.set RXBUF, 0x210000           # 8 RX buffers of 4 KiB
.set TXBUF, 0x220000           # 8 TX packets of 64 bytes
.set QSIZE, 8
_start:
    mov $0x90000, %esp
    mov $BASE, %esi
bringup:
    movl $0, 0x70(%esi)            # status 0: reset
    mov $RXD, %edi                 # rings and counters start at zero
    mov $(0x6000 / 4), %ecx
    xor %eax, %eax
    rep stosl
    movl $3, 0x70(%esi)            # ACKNOWLEDGE | DRIVER
    movl $1, 0x24(%esi)            # DriverFeaturesSel = 1
    movl $1, 0x20(%esi)            # VIRTIO_F_VERSION_1
    movl $0, 0x24(%esi)
    movl $0, 0x20(%esi)
    movl $0xb, 0x70(%esi)          # | FEATURES_OK
    movl $0, 0x30(%esi)            # queue 0 (RX)
    mov $RXD, %eax
    call setup_queue
    movl $1, 0x30(%esi)            # queue 1 (TX)
    mov $TXD, %eax
    call setup_queue
    xor %ecx, %ecx                 # RX descriptor i: 4 KiB at RXBUF + i * 4 KiB, device-writable
1:
    mov %ecx, %edi
    shl $4, %edi
    mov %ecx, %eax
    shl $12, %eax
    add $RXBUF, %eax
    mov %eax, RXD(%edi)
    movl $0x1000, RXD + 8(%edi)
    movw $2, RXD + 12(%edi)        # VIRTQ_DESC_F_WRITE
    mov %cx, RXA + 4(,%ecx,2)
    inc %ecx
    cmp $QSIZE, %ecx
    jne 1b
    movw $QSIZE, RXA + 2
    movw $QSIZE, RX_AVAIL
    movl $0xf, 0x70(%esi)          # | DRIVER_OK
    movl $0, 0x50(%esi)            # kick RX
    call tx_slot                   # REQUEST to host CID 2, port 6000, from port 1024
    mov 0x100(%esi), %eax          # guest CID from the config space
    mov %eax, 0(%ebp)
    movl $2, 8(%ebp)
    movl $1024, 16(%ebp)
    movl $6000, 20(%ebp)
    movw $1, 30(%ebp)              # OP_REQUEST
    call tx_send
poll:
    movzwl RXU + 2, %eax           # the device's used index
    cmp RX_SEEN, %ax
    je poll
    movzwl RX_SEEN, %ecx
    and $(QSIZE - 1), %ecx
    mov RXU + 4(,%ecx,8), %edx     # used element's descriptor id
    and $(QSIZE - 1), %edx
    mov %edx, %edi
    shl $12, %edi
    add $RXBUF, %edi               # the packet header
    movzwl 30(%edi), %eax          # op
    cmp $1, %eax                   # OP_REQUEST: answer with OP_RESPONSE
    je respond
    cmp $5, %eax                   # OP_RW: a command byte
    je command
repost:
    movzwl RX_AVAIL, %eax
    and $(QSIZE - 1), %eax
    mov %dx, RXA + 4(,%eax,2)
    incw RX_AVAIL
    movzwl RX_AVAIL, %eax
    mov %ax, RXA + 2
    incw RX_SEEN
    movl $0, 0x50(%esi)            # kick RX
    jmp poll
respond:
    call tx_slot
    mov 8(%edi), %eax              # src_cid = the request's dst_cid
    mov %eax, 0(%ebp)
    mov 0(%edi), %eax              # dst_cid = its src_cid
    mov %eax, 8(%ebp)
    mov 20(%edi), %eax             # ports swapped
    mov %eax, 16(%ebp)
    mov 16(%edi), %eax
    mov %eax, 20(%ebp)
    movw $2, 30(%ebp)              # OP_RESPONSE
    call tx_send
    jmp repost
command:
    movzbl 44(%edi), %eax          # first payload byte
    cmp $'r', %al
    je bringup                     # bringup starts with the reset
    cmp $'b', %al
    je reboot
    cmp $'p', %al
    jne repost
    movl $0, 0x70(%esi)            # reset the device, then power off
    mov $0x600, %dx
    mov $0x34, %al
    out %al, %dx
    jmp halt
reboot:
    movl $0, 0x70(%esi)            # reset the device, then reset the machine
    mov $0x602, %dx
    mov $1, %al
    out %al, %dx
halt:
    hlt
    jmp halt

setup_queue:                       # selected queue: size 8, rings at %eax, +4 KiB, +8 KiB
    movl $QSIZE, 0x38(%esi)
    mov %eax, 0x80(%esi)
    movl $0, 0x84(%esi)
    add $0x1000, %eax
    mov %eax, 0x90(%esi)
    movl $0, 0x94(%esi)
    add $0x1000, %eax
    mov %eax, 0xa0(%esi)
    movl $0, 0xa4(%esi)
    movl $1, 0x44(%esi)            # QueueReady
    ret

tx_slot:                           # %ebp = the next TX packet, zeroed but for type and credit
    movzwl TX_AVAIL, %ebp
    and $(QSIZE - 1), %ebp
    shl $6, %ebp
    add $TXBUF, %ebp
    push %edi
    mov %ebp, %edi
    mov $(64 / 4), %ecx
    xor %eax, %eax
    rep stosl
    pop %edi
    movw $1, 28(%ebp)              # VIRTIO_VSOCK_TYPE_STREAM
    movl $0x10000, 36(%ebp)        # buf_alloc
    ret

tx_send:                           # queue the 44-byte packet at %ebp on TX and kick
    movzwl TX_AVAIL, %eax
    and $(QSIZE - 1), %eax
    mov %eax, %ecx
    shl $4, %ecx
    mov %ebp, TXD(%ecx)
    movl $0, TXD + 4(%ecx)
    movl $44, TXD + 8(%ecx)
    movl $0, TXD + 12(%ecx)        # flags 0, next 0
    mov %ax, TXA + 4(,%eax,2)
    incw TX_AVAIL
    movzwl TX_AVAIL, %eax
    mov %ax, TXA + 2
    movl $1, 0x50(%esi)            # kick TX
    ret
