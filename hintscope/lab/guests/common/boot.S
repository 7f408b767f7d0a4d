/* Multiboot v1 entry shared by the bare-metal lab guests.
 * QEMU -kernel loads the ELF and enters _start in 32-bit flat protected mode with
 * EAX = multiboot magic and EBX = the multiboot info address; interrupts are off and stay off
 * (the guests poll, they never take an interrupt). guest_main(magic, mbi) is the guest's own.
 * The header must sit in the first 8 KiB of the file, hence at the start of .text. */
#define MB_MAGIC 0x1BADB002
#define MB_FLAGS 0x00000003 /* page-aligned modules, memory info */

	.section .text.multiboot, "ax"
	.align 4
	.long MB_MAGIC
	.long MB_FLAGS
	.long -(MB_MAGIC + MB_FLAGS)

	.text
	.globl _start
_start:
	cli
	mov $stack_top, %esp
	push %ebx
	push %eax
	call guest_main
1:	cli
	hlt
	jmp 1b

	.section .bss
	.align 4096
	.globl stack_bottom
stack_bottom:
	.skip 16384
	.globl stack_top
stack_top:
