/* Shared support for the bare-metal lab guests (dirtier, hintguest): port I/O, TSC, 64-bit
 * division, the COM1 serial console, PIT-based TSC calibration, multiboot info and command-line
 * number parsing. The guests run in 32-bit flat protected mode with interrupts off and no
 * paging, so everything here polls. Link with common/boot.S (which calls guest_main) and
 * common/link.ld. */
#ifndef HINTSCOPE_BAREMETAL_H
#define HINTSCOPE_BAREMETAL_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

/* From link.ld / boot.S. */
extern char image_start[], image_end[], bss_start[], stack_bottom[], stack_top[];

static inline void outb(u16 p, u8 v) { __asm__ volatile("outb %0, %1" ::"a"(v), "Nd"(p)); }
static inline void outw(u16 p, u16 v) { __asm__ volatile("outw %0, %1" ::"a"(v), "Nd"(p)); }
static inline void outl(u16 p, u32 v) { __asm__ volatile("outl %0, %1" ::"a"(v), "Nd"(p)); }
static inline u8 inb(u16 p) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(p)); return v; }
static inline u16 inw(u16 p) { u16 v; __asm__ volatile("inw %1, %0" : "=a"(v) : "Nd"(p)); return v; }
static inline u32 inl(u16 p) { u32 v; __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(p)); return v; }
static inline u64 rdtsc(void) { u32 lo, hi; __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi)); return ((u64)hi << 32) | lo; }
#define barrier() __asm__ volatile("" ::: "memory")

/* 64/32 division without libgcc; *rem (if not null) gets the remainder. */
u64 udiv64(u64 n, u32 d, u32 *rem);

/* COM1 at 115200 8N1. putc gives up waiting for the transmitter after a bounded spin. */
void serial_init(void);
void putc(char c);
void puts(const char *s);
void putdec(u64 v);
void puthex(u64 v);   /* "0x" then lower-case hex without leading zeros */
/* Called with every byte putc has sent, when set (hintguest keeps dirtying pages while it prints). */
extern void (*serial_hook)(char c);

/* TSC frequency from a 50 ms one-shot on PIT channel 2; 2 GHz guessed (tsc_calibrated = 0)
 * if the PIT never fires. */
extern u64 tsc_hz;
extern int tsc_calibrated;
void calibrate_tsc(void);

/* Checks the multiboot magic, copies the command line into mb_cmdline (the info area is not
 * ours to keep) and sets *mem_pages to the RAM top in 4 KiB pages (0 if the loader gave no
 * memory info). Returns an error message or 0. */
extern char mb_cmdline[1024];
const char *multiboot_read(u32 magic, const u32 *mbi, u64 *mem_pages);

/* Command line: cmdline_key(s, "rate", &v) is 1 if token s is "rate=...", with v after the '='.
 * parse_num reads a decimal or 0x-hex number at *p, advances *p past it and returns 0 if there
 * were no digits or the value is absurdly large. */
int cmdline_key(const char *s, const char *k, const char **val);
int parse_num(const char **p, u64 *out);

void guest_main(u32 magic, u32 *mbi);

#endif
