/* Multiboot v1 entry for hintguest: QEMU -kernel enters _start in 32-bit flat protected mode
 * with EAX = multiboot magic, EBX = multiboot info; interrupts stay off for the whole run
 * (the guest polls the device, it never takes an interrupt). */
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
	call hintguest_main
1:	cli
	hlt
	jmp 1b

	.section .bss
	.align 4096
stack_bottom:
	.skip 16384
	.globl stack_top
stack_top:
