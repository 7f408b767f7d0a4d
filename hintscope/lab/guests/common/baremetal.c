/* Shared support for the bare-metal lab guests; see baremetal.h. */
#include "baremetal.h"

#define COM1 0x3F8

u64 udiv64(u64 n, u32 d, u32 *rem)
{
	/* two divl steps: the high word first, its remainder feeds the low one */
	u32 hi = (u32)(n >> 32), lo = (u32)n, qhi = hi / d, r = hi % d, qlo;
	__asm__("divl %4" : "=a"(qlo), "=d"(r) : "a"(lo), "d"(r), "rm"(d));
	if (rem)
		*rem = r;
	return ((u64)qhi << 32) | qlo;
}

/* ---- serial ---- */
void (*serial_hook)(char c);

void serial_init(void)
{
	outb(COM1 + 1, 0x00);
	outb(COM1 + 3, 0x80);
	outb(COM1 + 0, 0x01); /* 115200 */
	outb(COM1 + 1, 0x00);
	outb(COM1 + 3, 0x03); /* 8N1 */
	outb(COM1 + 2, 0xC7);
	outb(COM1 + 4, 0x03);
}
void putc(char c)
{
	for (u32 i = 0; i < 100000 && !(inb(COM1 + 5) & 0x20); i++)
		;
	outb(COM1, (u8)c);
	if (serial_hook)
		serial_hook(c);
}
void puts(const char *s) { while (*s) putc(*s++); }
void putdec(u64 v)
{
	char b[24];
	int i = 0;
	u32 r;
	do { v = udiv64(v, 10, &r); b[i++] = (char)('0' + r); } while (v);
	while (i) putc(b[--i]);
}
void puthex(u64 v)
{
	int i = 60;
	puts("0x");
	while (i > 0 && !((v >> i) & 0xf)) i -= 4;
	for (; i >= 0; i -= 4) putc("0123456789abcdef"[(v >> i) & 0xf]);
}

/* ---- time ---- */
u64 tsc_hz;
int tsc_calibrated;

/* 50 ms one-shot on PIT channel 2, gated through port 0x61; its output shows in bit 5. */
void calibrate_tsc(void)
{
	const u32 latch = 1193182 / 20;
	u64 t0, t1;
	u32 i;
	outb(0x61, (inb(0x61) & ~0x02) | 0x01);
	outb(0x43, 0xB0);
	outb(0x42, latch & 0xff);
	outb(0x42, latch >> 8);
	t0 = rdtsc();
	for (i = 0; i < (1u << 28) && !(inb(0x61) & 0x20); i++)
		;
	t1 = rdtsc();
	tsc_calibrated = i < (1u << 28) && t1 > t0;
	tsc_hz = tsc_calibrated ? (t1 - t0) * 20 : 2000000000ull;
}

/* ---- multiboot info and command line ---- */
char mb_cmdline[1024];

const char *multiboot_read(u32 magic, const u32 *mbi, u64 *mem_pages)
{
	if (magic != 0x2BADB002)
		return "not booted by a multiboot loader";
	if ((mbi[0] & 4) && mbi[4]) {
		const char *c = (const char *)mbi[4];
		u32 i = 0;
		for (; c[i] && i < sizeof(mb_cmdline) - 1; i++) mb_cmdline[i] = c[i];
		mb_cmdline[i] = 0;
	}
	/* mem_upper (KiB above 1 MiB) */
	*mem_pages = (mbi[0] & 1) ? (0x100000ull + (u64)mbi[2] * 1024) >> 12 : 0;
	return 0;
}

int cmdline_key(const char *s, const char *k, const char **val)
{
	while (*k && *s == *k) { s++; k++; }
	if (*k || *s != '=') return 0;
	*val = s + 1;
	return 1;
}

int parse_num(const char **p, u64 *out)
{
	const char *s = *p;
	u64 v = 0;
	int base = 10, n = 0;
	if (s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) { base = 16; s += 2; }
	for (;; s++, n++) {
		int d;
		if (*s >= '0' && *s <= '9') d = *s - '0';
		else if (base == 16 && *s >= 'a' && *s <= 'f') d = *s - 'a' + 10;
		else if (base == 16 && *s >= 'A' && *s <= 'F') d = *s - 'A' + 10;
		else break;
		if (v >> 56) return 0; /* absurdly large */
		v = v * base + d;
	}
	*p = s;
	*out = v;
	return n > 0;
}
