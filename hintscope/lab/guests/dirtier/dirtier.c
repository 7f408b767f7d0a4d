/* dirtier: a bare-metal guest that writes a known set of pages at a known rate.
 *
 * Command line (multiboot, QEMU -append), key=value tokens, others ignored:
 *   pages=SPEC   comma list of gfns or gfn ranges "a-b" (inclusive), hex with 0x or decimal.
 *                Default 0x400-0x4ff (256 pages at 4 MiB).
 *   rate=N       page writes per second (0 = as fast as possible). Default 20000.
 *   rounds=N     stop writing after N passes over the set (0 = never). Default 0.
 *   log_ms=N     heartbeat interval on the serial port. Default 500.
 *   fill_mb=N    once at start, fill N MiB from gfn fill_at (default 0x1000) with a non-zero
 *                pattern, so migration has real pages to move in its bulk round. Default 0.
 *
 * Every write stamps a record at the start of the page and the sequence number at its end,
 * so a destination page can be told apart from an older copy of itself:
 *   u32 magic 'DRTY', u32 gfn, u64 seq (global, 1-based), u32 round, u32 ~gfn
 * Serial (0x3F8) lines all start with "DIRTIER ": ready / error / hb / done.
 * Runs with interrupts off and no paging; time comes from the TSC, calibrated on PIT channel 2.
 */
#include "baremetal.h"

#define MAGIC 0x59545244u /* "DRTY" little-endian */
#define MAX_RANGES 64

/* ---- parameters ---- */
static struct { u32 first, last; } ranges[MAX_RANGES];
static int nranges;
static u64 rate = 20000, rounds, log_ms = 500, fill_mb, fill_at = 0x1000;

static int end_of_token(char c) { return c == 0 || c == ' '; }

static const char *parse_pages(const char *s)
{
	nranges = 0;
	while (!end_of_token(*s)) {
		u64 a, b;
		if (!parse_num(&s, &a)) return "pages: expected a number";
		b = a;
		if (*s == '-') { s++; if (!parse_num(&s, &b)) return "pages: expected a range end"; }
		if (b < a) return "pages: range end below start";
		if (b >> 32) return "pages: gfn too large";
		if (nranges == MAX_RANGES) return "pages: too many ranges (max 64)";
		ranges[nranges].first = (u32)a;
		ranges[nranges].last = (u32)b;
		nranges++;
		if (*s == ',') s++;
		else if (!end_of_token(*s)) return "pages: unexpected character";
	}
	return nranges ? 0 : "pages: empty";
}

static const char *parse_cmdline(const char *s)
{
	ranges[0].first = 0x400; ranges[0].last = 0x4ff; nranges = 1;
	while (*s) {
		const char *v, *err;
		while (*s == ' ') s++;
		if (cmdline_key(s, "pages", &v)) { if ((err = parse_pages(v))) return err; }
		else if (cmdline_key(s, "rate", &v)) { if (!parse_num(&v, &rate)) return "rate: expected a number"; }
		else if (cmdline_key(s, "rounds", &v)) { if (!parse_num(&v, &rounds)) return "rounds: expected a number"; }
		else if (cmdline_key(s, "fill_mb", &v)) { if (!parse_num(&v, &fill_mb)) return "fill_mb: expected a number"; }
		else if (cmdline_key(s, "fill_at", &v)) { if (!parse_num(&v, &fill_at)) return "fill_at: expected a number"; }
		else if (cmdline_key(s, "log_ms", &v)) { if (!parse_num(&v, &log_ms) || !log_ms) return "log_ms: expected a positive number"; }
		while (*s && *s != ' ') s++;
	}
	return 0;
}

static void check_ranges(const char **err, u64 mem_pages)
{
	u32 img0 = (u32)image_start >> 12, img1 = ((u32)image_end + 4095) >> 12;
	if (fill_mb) {
		u64 f0 = fill_at, f1 = fill_at + fill_mb * 256 - 1;
		if (f0 < img1 || f1 >= mem_pages) { *err = "fill: outside the guest's RAM above the image"; return; }
		for (int i = 0; i < nranges; i++)
			if (ranges[i].first <= f1 && ranges[i].last >= f0) { *err = "fill: overlaps pages"; return; }
	}
	for (int i = 0; i < nranges; i++) {
		if (ranges[i].first < 0x100) { *err = "pages: below 1 MiB (BIOS and device area)"; return; }
		if (ranges[i].last >= mem_pages) { *err = "pages: beyond the guest's RAM"; return; }
		if (ranges[i].first < img1 && ranges[i].last >= img0) { *err = "pages: overlap the dirtier image"; return; }
	}
}

struct record { u32 magic, gfn; u64 seq; u32 round, ngfn; };

void guest_main(u32 magic, u32 *mbi)
{
	const char *err;
	u64 mem_pages = 0, npages = 0, seq = 0, round = 0, hb = 0;
	serial_init();
	err = multiboot_read(magic, mbi, &mem_pages);
	if (!err) err = parse_cmdline(mb_cmdline);
	if (!err) check_ranges(&err, mem_pages);
	if (err) { puts("DIRTIER error: "); puts(err); puts("\n"); return; }
	calibrate_tsc();
	for (int i = 0; i < nranges; i++) npages += ranges[i].last - ranges[i].first + 1;
	u64 fill_tsc = rdtsc();
	if (fill_mb) {
		/* One rep stosl per page: plain stores trap to the hypervisor one by one here,
		 * string instructions are emulated in batches. The page's gfn goes in word 1. */
		for (u64 g = fill_at; g < fill_at + fill_mb * 256; g++) {
			u32 *w = (u32 *)(u32)(g << 12), cnt = 1024;
			__asm__ volatile("rep stosl" : "+D"(w), "+c"(cnt) : "a"(0x4c4c4946u) : "memory");
			((volatile u32 *)(u32)(g << 12))[1] = (u32)g;
		}
	}
	fill_tsc = rdtsc() - fill_tsc;

	puts("DIRTIER ready tsc_hz="); putdec(tsc_hz);
	puts(tsc_calibrated ? " tsc_src=pit" : " tsc_src=guess");
	puts(" mem_pages="); putdec(mem_pages);
	puts(" npages="); putdec(npages);
	puts(" rate="); putdec(rate);
	puts(" rounds="); putdec(rounds);
	puts(" fill_mb="); putdec(fill_mb);
	puts(" fill_at="); puthex(fill_at);
	puts(" fill_tsc="); putdec(fill_tsc);
	puts(" image="); puthex((u32)image_start >> 12); putc('-'); puthex(((u32)image_end >> 12) - 1);
	puts(" bss="); puthex((u32)bss_start >> 12); putc('-'); puthex(((u32)image_end >> 12) - 1);
	puts(" pages=");
	for (int i = 0; i < nranges; i++) {
		if (i) putc(',');
		puthex(ranges[i].first);
		if (ranges[i].last != ranges[i].first) { putc('-'); puthex(ranges[i].last); }
	}
	puts("\n");

	u64 per_write = rate ? udiv64(tsc_hz, (u32)(rate > 0xffffffffull ? 0xffffffffu : rate), 0) : 0;
	u64 per_log = udiv64(tsc_hz, 1000, 0) * log_ms;
	u64 start = rdtsc(), next_log = start + per_log, paced = 0, last_now;
	/* A pause longer than this (e.g. migration downtime) restarts pacing instead of bursting. */
	u64 max_lag = udiv64(tsc_hz, 20, 0);
	int done = 0;
	for (;;) {
		if (!done) {
			for (int i = 0; i < nranges; i++) {
				for (u64 g = ranges[i].first; g <= ranges[i].last; g++) {
					if (per_write) {
						/* rdtsc is slow here (it traps), so pace in bursts of 16 writes. */
						if (!(paced & 15)) {
							u64 due = start + paced * per_write;
							last_now = rdtsc();
							if (last_now > due + max_lag) { start = last_now; paced = 0; due = start; }
							while (last_now < due)
								last_now = rdtsc();
						}
						paced++;
					}
					volatile struct record *r = (volatile struct record *)(u32)(g << 12);
					seq++;
					r->magic = MAGIC;
					r->gfn = (u32)g;
					r->seq = seq;
					r->round = (u32)round;
					r->ngfn = ~(u32)g;
					*(volatile u64 *)(u32)((g << 12) + 4088) = seq;
				}
			}
			round++;
			if (rounds && round >= rounds) {
				done = 1;
				puts("DIRTIER done round="); putdec(round); puts(" seq="); putdec(seq); puts("\n");
			}
		}
		u64 now = rdtsc();
		if (now >= next_log) {
			hb++;
			puts("DIRTIER hb="); putdec(hb);
			puts(" round="); putdec(round);
			puts(" seq="); putdec(seq);
			puts(" tsc="); putdec(now);
			puts("\n");
			next_log = now + per_log;
		}
	}
}
