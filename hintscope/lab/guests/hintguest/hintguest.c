/* hintguest: a bare-metal virtio-balloon free page hinting driver that logs its own writes.
 *
 * Purpose: reproduce (or rule out) the QEMU manual-protect race (c'): a page dirty at the last
 * KVM_GET_DIRTY_LOG, written by the guest after it was hinted and before QEMU applies the hint,
 * loses that write when qemu_guest_free_page_hint() clears the chunk with KVM_CLEAR_DIRTY_LOG
 * and drops the page from the migration bitmap.
 *
 * Command line (multiboot, QEMU -append), key=value tokens, unknown keys are ignored:
 *   behaviour=polite|early-reuse|late-reuse
 *       polite: never touches a hinted block before DONE.
 *       early-reuse: writes `reuse` pages of every hinted block after the blocks are made
 *         available (avail idx published) but before the kick (legal per VIRTIO 1.2 5.5.6.5.1).
 *       late-reuse: writes them right after the kick.
 *   pool=GFN       first gfn of the hint pool (default 0x40000 = 1 GiB: QEMU's second 1 GiB
 *                  clear_bmap chunk, which the migration thread reaches last).
 *   pool_blocks=N  4 MiB blocks in the pool (default 64); round r hints blocks [r*nblocks, ...).
 *   nblocks=N      blocks hinted per cmd id (default 8).
 *   reuse=N        pages written per hinted block by the reuse behaviours (default 4, stride 256).
 *   fill_mb=N      non-zero fill of N MiB from gfn 0x1000 at boot (default 64): round 1 then
 *                  spends time in the first chunk before it reaches the pool.
 *   bg=A-B         gfn range the background writer keeps dirtying (default 0x1000-0x4fff).
 *   rounds=N       hint for the first N cmd ids only, then stop the background writer (log
 *                  `bg_stop`) so the migration can converge (default 3); 0 = forever.
 *   log_ms=N       heartbeat period (default 250).
 *   stale=1        control: the start message carries id-1, so the host drops every hint
 *                  (same writes, same timing, no qemu_guest_free_page_hint).
 *   zero=1         zero every page of each block after the cmd id is seen and before the block
 *                  is hinted, as a Linux guest with init_on_alloc does when its driver
 *                  allocates the block (log `zero`). Combines with any behaviour.
 *
 * Every pool block is "used" (each page stamped 'HGUS') before it is hinted: at boot for the
 * first round, for later rounds right after the host has consumed the previous round, so the
 * block is dirty at the next sync. Reuse writes stamp 'HGRW' records carrying a global sequence.
 *
 * Serial (0x3F8): one event per line, `HG t=<tsc> ev=<name> key=value ...`. Interrupts stay off;
 * the config space and used ring are polled.
 */
#include "baremetal.h"

#define BLOCK_PAGES 1024u                 /* 4 MiB: Linux's MAX_ORDER-1 hint granularity */
#define MAGIC_USE 0x53554748u             /* "HGUS" */
#define MAGIC_REUSE 0x57524748u           /* "HGRW" */
#define MAGIC_BG 0x47424748u              /* "HGBG" */
#define MAGIC_FILL 0x4c464748u            /* "HGFL" */
#define CMD_ID_STOP 0u
#define CMD_ID_DONE 1u
#define CMD_ID_MIN 0x80000000u
#define F_FREE_PAGE_HINT 3
#define FREE_PAGE_VQ 3                    /* QEMU 7.2 realize: ivq, dvq, svq, then free_page_vq */
#define QMAX 1024
#define MAX_REUSE 64
#define MAX_BLOCKS 256

/* legacy virtio-pci I/O BAR registers */
#define VP_HOST_FEATURES 0
#define VP_GUEST_FEATURES 4
#define VP_QUEUE_PFN 8
#define VP_QUEUE_NUM 12
#define VP_QUEUE_SEL 14
#define VP_QUEUE_NOTIFY 16
#define VP_STATUS 18
#define VP_ISR 19
#define VP_CONFIG 20                      /* no MSI-X enabled */
#define CFG_CMD_ID 8
#define S_ACK 1
#define S_DRIVER 2
#define S_DRIVER_OK 4
#define S_FAILED 128
#define VRING_DESC_F_WRITE 2

/* ---- background writer (keeps later rounds coming; see bg_tick) ---- */
static u64 bg_first = 0x1000, bg_last = 0x4fff, bg_g = 0x1000, bg_pass;
static int bg_on = 1;
static void stamp(u64 gfn, u32 magic, u32 round, u32 id);
/* Called from the slow paths (printing, using blocks) too: a pause in dirtying would let the
 * migration converge in the middle of a round and cut the guest's log short. */
static void bg_tick(u32 n)
{
	if (!bg_on)
		return;
	for (u32 i = 0; i < n; i++) {
		stamp(bg_g, MAGIC_BG, (u32)bg_pass, 0);
		if (++bg_g > bg_last) { bg_g = bg_first; bg_pass++; }
	}
}

/* ---- serial (baremetal.c) ---- */
static void bg_on_print(char c)
{
	if (c == ' ' || c == '\n')
		bg_tick(4);
}
/* Every event line starts with the TSC at which the event happened (not when it is printed). */
static void ev(u64 t, const char *name) { puts("HG t="); putdec(t); puts(" ev="); puts(name); }
static void kv(const char *k, u64 v) { putc(' '); puts(k); putc('='); putdec(v); }
static void kx(const char *k, u64 v) { putc(' '); puts(k); putc('='); puthex(v); }
static void ks(const char *k, const char *v) { putc(' '); puts(k); putc('='); puts(v); }
static void eol(void) { putc('\n'); }

/* ---- parameters ---- */
enum { POLITE, EARLY, LATE };
static const char *bnames[] = {"polite", "early-reuse", "late-reuse"};
static int behaviour = POLITE;
static u64 pool = 0x40000, pool_blocks = 64, nblocks = 8, reuse = 4, fill_mb = 64, rounds = 3, log_ms = 250, stale, zero;

/* A number must end the token (or start a range). */
static int parse_val(const char **p, u64 *out)
{
	return parse_num(p, out) && (**p == 0 || **p == ' ' || **p == '-');
}

static int word(const char *s, const char *w)
{
	while (*w && *s == *w) { s++; w++; }
	return !*w && (*s == 0 || *s == ' ');
}

static const char *parse_cmdline(const char *s)
{
	while (*s) {
		const char *v;
		while (*s == ' ') s++;
		if (cmdline_key(s, "behaviour", &v)) {
			int i;
			for (i = 0; i < 3 && !word(v, bnames[i]); i++)
				;
			if (i == 3) return "behaviour: expected polite, early-reuse or late-reuse";
			behaviour = i;
		}
		else if (cmdline_key(s, "pool", &v)) { if (!parse_val(&v, &pool)) return "pool: expected a gfn"; }
		else if (cmdline_key(s, "pool_blocks", &v)) { if (!parse_val(&v, &pool_blocks)) return "pool_blocks: expected a number"; }
		else if (cmdline_key(s, "nblocks", &v)) { if (!parse_val(&v, &nblocks) || !nblocks) return "nblocks: expected a positive number"; }
		else if (cmdline_key(s, "reuse", &v)) { if (!parse_val(&v, &reuse)) return "reuse: expected a number"; }
		else if (cmdline_key(s, "fill_mb", &v)) { if (!parse_val(&v, &fill_mb)) return "fill_mb: expected a number"; }
		else if (cmdline_key(s, "stale", &v)) { if (!parse_val(&v, &stale) || stale > 1) return "stale: expected 0 or 1"; }
		else if (cmdline_key(s, "zero", &v)) { if (!parse_val(&v, &zero) || zero > 1) return "zero: expected 0 or 1"; }
		else if (cmdline_key(s, "rounds", &v)) { if (!parse_val(&v, &rounds)) return "rounds: expected a number"; }
		else if (cmdline_key(s, "log_ms", &v)) { if (!parse_val(&v, &log_ms) || !log_ms) return "log_ms: expected a positive number"; }
		else if (cmdline_key(s, "bg", &v)) {
			if (!parse_val(&v, &bg_first) || *v++ != '-' || !parse_val(&v, &bg_last) || bg_last < bg_first)
				return "bg: expected GFN-GFN";
		}
		while (*s && *s != ' ') s++;
	}
	return 0;
}

static const char *check_params(u64 mem_pages)
{
	u64 img_end = ((u32)image_end + 4095) >> 12;
	if (pool & (BLOCK_PAGES - 1)) return "pool: not 4 MiB aligned";
	if (pool_blocks > MAX_BLOCKS || nblocks > pool_blocks) return "pool_blocks/nblocks: at most 256, nblocks <= pool_blocks";
	if (nblocks + 2 > QMAX) return "nblocks: too many for the virtqueue";
	if (reuse > MAX_REUSE || reuse * 256 > BLOCK_PAGES * 4) return "reuse: at most 64";
	if (pool < img_end || pool + pool_blocks * BLOCK_PAGES > mem_pages) return "pool: outside RAM above the image";
	if (bg_first < img_end || bg_last >= mem_pages) return "bg: outside RAM above the image";
	if (bg_last >= pool && bg_first < pool + pool_blocks * BLOCK_PAGES) return "bg: overlaps the pool";
	if (fill_mb && (0x1000 < img_end || 0x1000 + fill_mb * 256 > pool)) return "fill_mb: the fill must end below the pool";
	return 0;
}

/* ---- PCI ---- */
static u32 pci_read(u32 bdf, u32 off) { outl(0xCF8, 0x80000000u | bdf << 8 | (off & 0xfc)); return inl(0xCFC); }
static void pci_write(u32 bdf, u32 off, u32 v) { outl(0xCF8, 0x80000000u | bdf << 8 | (off & 0xfc)); outl(0xCFC, v); }

/* ---- virtqueue (legacy layout, 4096 alignment) ---- */
struct vring_desc { u64 addr; u32 len; u16 flags, next; };
struct vring_used_elem { u32 id, len; };

static u8 vq_mem[65536] __attribute__((aligned(4096)));
static volatile struct vring_desc *desc;
static volatile u16 *avail;           /* flags, idx, ring[qsize], used_event */
static volatile u16 *used;            /* flags, idx, then elems */
static u32 qsize;
static u16 avail_idx;                 /* next avail index (free running) */
static u16 iobase;
static volatile u32 cmd_buf[QMAX];    /* out-buffer payloads, one per descriptor slot */

static u16 used_idx(void) { barrier(); return used[1]; }

/* Adds one single-descriptor element; the ring is consumed in order so slot = index mod size. */
static u32 vq_add(u32 addr, u32 len, u16 flags)
{
	u32 slot = avail_idx % qsize;
	desc[slot].addr = addr;
	desc[slot].len = len;
	desc[slot].flags = flags;
	desc[slot].next = 0;
	avail[2 + slot] = (u16)slot;
	avail_idx++;
	return slot;
}
static void vq_publish(void) { barrier(); avail[1] = avail_idx; barrier(); }
static void vq_kick(void) { outw(iobase + VP_QUEUE_NOTIFY, FREE_PAGE_VQ); }
static u32 vq_free(void) { return qsize - (u16)(avail_idx - used_idx()); }

static u32 cfg_cmd_id(void) { return inl(iobase + VP_CONFIG + CFG_CMD_ID); }

static const char *balloon_init(void)
{
	u32 bdf, found = 0, bar;
	for (bdf = 0; bdf < 32 * 8 && !found; bdf += 8) {
		u32 id = pci_read(bdf, 0);
		if ((id & 0xffff) == 0x1af4 && (id >> 16) == 0x1002) found = bdf | 0x10000;
	}
	if (!found) return "no virtio-balloon (1af4:1002) on PCI bus 0";
	bdf = found & 0xffff;
	bar = pci_read(bdf, 0x10);
	if (!(bar & 1)) return "balloon BAR0 is not an I/O BAR (not a transitional device?)";
	iobase = (u16)(bar & ~3u);
	pci_write(bdf, 0x04, (pci_read(bdf, 0x04) & 0xffff0000u) | 0x0005); /* I/O space + bus master */

	outb(iobase + VP_STATUS, 0);
	outb(iobase + VP_STATUS, S_ACK);
	outb(iobase + VP_STATUS, S_ACK | S_DRIVER);
	u32 hf = inl(iobase + VP_HOST_FEATURES);
	u64 t = rdtsc();
	if (!(hf & (1u << F_FREE_PAGE_HINT))) {
		outb(iobase + VP_STATUS, S_FAILED);
		return "host does not offer FREE_PAGE_HINT (free-page-hint=on missing?)";
	}
	outl(iobase + VP_GUEST_FEATURES, 1u << F_FREE_PAGE_HINT);
	u32 qn[4];
	for (u32 q = 0; q < 4; q++) { outw(iobase + VP_QUEUE_SEL, (u16)q); qn[q] = inw(iobase + VP_QUEUE_NUM); }
	qsize = qn[FREE_PAGE_VQ];
	if (!qsize || qsize > QMAX || (qsize & (qsize - 1))) { outb(iobase + VP_STATUS, S_FAILED); return "free page vq has no usable size"; }
	u32 used_off = (16 * qsize + 2 * (3 + qsize) + 4095) & ~4095u;
	if (used_off + 6 + 8 * qsize > sizeof(vq_mem)) return "vq_mem too small";
	desc = (volatile struct vring_desc *)vq_mem;
	avail = (volatile u16 *)(vq_mem + 16 * qsize);
	used = (volatile u16 *)(vq_mem + used_off);
	outw(iobase + VP_QUEUE_SEL, FREE_PAGE_VQ);
	outl(iobase + VP_QUEUE_PFN, (u32)vq_mem >> 12);
	outb(iobase + VP_STATUS, S_ACK | S_DRIVER | S_DRIVER_OK);
	ev(t, "balloon");
	kx("bdf", bdf); kx("iobase", iobase); kx("host_features", hf); kx("guest_features", 1u << F_FREE_PAGE_HINT);
	kv("vq", FREE_PAGE_VQ); kv("qsize", qsize);
	kv("q0", qn[0]); kv("q1", qn[1]); kv("q2", qn[2]);
	kx("vring", (u32)vq_mem); kx("status", inb(iobase + VP_STATUS));
	eol();
	return 0;
}

/* ---- memory stamping ---- */
struct record { u32 magic, gfn; u64 seq; u32 round, id; };
static u64 seq;

static void stamp(u64 gfn, u32 magic, u32 round, u32 id)
{
	volatile struct record *r = (volatile struct record *)(u32)(gfn << 12);
	seq++;
	r->magic = magic;
	r->gfn = (u32)gfn;
	r->seq = seq;
	r->round = round;
	r->id = id;
	*(volatile u64 *)(u32)((gfn << 12) + 4088) = seq;
}

/* Writes every page of blocks [b0, b0+n): makes them dirty for the next sync. */
static void use_blocks(u64 b0, u64 n, u32 round)
{
	u64 t0 = rdtsc();
	for (u64 b = b0; b < b0 + n && b < pool_blocks; b++)
		for (u64 g = pool + b * BLOCK_PAGES; g < pool + (b + 1) * BLOCK_PAGES; g++) {
			stamp(g, MAGIC_USE, round, 0);
			if (!(g & 7))
				bg_tick(1);
		}
	u64 t1 = rdtsc();
	if (b0 >= pool_blocks) return;
	ev(t0, "use"); kx("gfn", pool + b0 * BLOCK_PAGES); kv("npages", (n > pool_blocks - b0 ? pool_blocks - b0 : n) * BLOCK_PAGES);
	kv("round", round); kv("t_end", t1); kv("seq", seq); eol();
}

/* Leaves every page of blocks [b0, b0+n) all zero, as init_on_alloc does to a block the Linux
 * driver allocates for hinting: after the cmd id, before the hint. A pool page's only non-zero
 * words are its record (stamp): clearing those four words writes the page and makes it a zero
 * page, without 512 stores per page (this PVM host emulates guest stores: ~4 s per 32 MiB). */
static void zero_blocks(u64 b0, u64 n)
{
	for (u64 b = b0; b < b0 + n && b < pool_blocks; b++)
		for (u64 g = pool + b * BLOCK_PAGES; g < pool + (b + 1) * BLOCK_PAGES; g++) {
			volatile u64 *w = (volatile u64 *)(u32)(g << 12);
			w[0] = 0;
			w[1] = 0;
			w[2] = 0;
			w[511] = 0;
			if (!(g & 7))
				bg_tick(1);
		}
}

/* ---- one hinting round for cmd id `id` ---- */
static u64 reuse_t[MAX_BLOCKS * MAX_REUSE / 16];
static u64 reuse_seq[MAX_BLOCKS * MAX_REUSE / 16];
static u32 reuse_gfn[MAX_BLOCKS * MAX_REUSE / 16];
static u32 hint_round;

static u32 do_reuse(u64 b0, u32 id, u32 n_max)
{
	u32 n = 0;
	for (u64 b = b0; b < b0 + nblocks; b++)
		for (u64 i = 0; i < reuse && n < n_max; i++) {
			u64 g = pool + b * BLOCK_PAGES + i * 256;
			reuse_t[n] = rdtsc();
			stamp(g, MAGIC_REUSE, hint_round, id);
			reuse_seq[n] = seq;
			reuse_gfn[n] = (u32)g;
			n++;
		}
	return n;
}

static void log_reuse(u32 n, u32 id, const char *phase)
{
	for (u32 i = 0; i < n; i++) {
		ev(reuse_t[i], "write"); kx("id", id); kx("gfn", reuse_gfn[i]); kv("seq", reuse_seq[i]);
		ks("phase", phase); kv("round", hint_round); eol();
	}
}

static void hint_round_run(u32 id)
{
	u64 b0 = (u64)hint_round * nblocks, t;
	u32 n_reuse = 0, cap = sizeof(reuse_t) / sizeof(reuse_t[0]);
	hint_round++;
	if (b0 + nblocks > pool_blocks) {
		ev(rdtsc(), "pool_empty"); kx("id", id); kv("round", hint_round); eol();
		return;
	}
	/* Wait for room: the previous round's buffers come back once the host has popped them. */
	u64 deadline = rdtsc() + tsc_hz * 2;
	while (vq_free() < nblocks + 2 && rdtsc() < deadline)
		;
	if (vq_free() < nblocks + 2) {
		ev(rdtsc(), "error"); ks("msg", "virtqueue_full"); kx("id", id); eol();
		return;
	}
	u64 t_zero = rdtsc(), t_zero_end = 0;
	if (zero) {
		zero_blocks(b0, nblocks);
		t_zero_end = rdtsc();
	}
	u32 s0 = avail_idx;
	u32 slot = vq_add((u32)&cmd_buf[avail_idx % qsize], 4, 0);
	/* stale=1 (control run): the start message carries the previous id, so QEMU stays in
	 * REQUESTED and pushes the hints back unused; timing and writes are otherwise identical. */
	cmd_buf[slot] = stale ? id - 1 : id;
	for (u64 b = b0; b < b0 + nblocks; b++)
		vq_add((u32)((pool + b * BLOCK_PAGES) << 12), BLOCK_PAGES * 4096, VRING_DESC_F_WRITE);
	u64 t_avail = rdtsc();
	vq_publish();
	if (behaviour == EARLY)
		n_reuse = do_reuse(b0, id, cap);
	u64 t_kick = rdtsc();
	vq_kick();
	if (behaviour == LATE)
		n_reuse = do_reuse(b0, id, cap);
	u32 s1 = avail_idx;
	slot = vq_add((u32)&cmd_buf[avail_idx % qsize], 4, 0);
	cmd_buf[slot] = CMD_ID_STOP;
	u64 t_stop = rdtsc();
	vq_publish();
	vq_kick();

	/* The log comes after the fact so that printing (one VM exit per byte) does not widen
	 * or narrow the race window the behaviour is about. */
	if (zero) {
		ev(t_zero, "zero"); kx("id", id); kx("gfn", pool + b0 * BLOCK_PAGES); kv("npages", nblocks * BLOCK_PAGES);
		kv("round", hint_round); kv("t_end", t_zero_end); eol();
	}
	ev(t_avail, "start"); kx("id", id); kv("round", hint_round); kv("avail_idx", s0);
	if (stale) kx("sent_id", id - 1);
	eol();
	for (u64 b = b0; b < b0 + nblocks; b++) {
		ev(t_avail, "hint"); kx("id", id); kx("gfn", pool + b * BLOCK_PAGES); kv("npages", BLOCK_PAGES);
		kv("round", hint_round); kv("avail_idx", s0 + 1 + (b - b0)); eol();
	}
	ev(t_avail, "avail"); kx("id", id); kv("idx", s1); eol();
	if (behaviour == EARLY) log_reuse(n_reuse, id, "early");
	ev(t_kick, "kick"); kx("id", id); eol();
	if (behaviour == LATE) log_reuse(n_reuse, id, "late");
	ev(t_stop, "stop"); kx("id", id); kv("avail_idx", s1); eol();

	deadline = rdtsc() + tsc_hz * 2;
	while ((u16)(avail_idx - used_idx()) && (t = rdtsc()) < deadline)
		;
	t = rdtsc();
	if ((u16)(avail_idx - used_idx())) {
		ev(t, "used_timeout"); kx("id", id); kv("used_idx", used_idx()); kv("avail_idx", avail_idx); eol();
		return;
	}
	ev(t, "used"); kx("id", id); kv("used_idx", used_idx()); eol();
	/* Next round's blocks are written now, after this round's CLEAR of the chunk, so that they
	 * are dirty (and writable) at the next sync. */
	use_blocks(b0 + nblocks, nblocks, hint_round + 1);
}

void guest_main(u32 magic, u32 *mbi)
{
	const char *err;
	u64 mem_pages = 0;
	serial_hook = bg_on_print;
	serial_init();
	err = multiboot_read(magic, mbi, &mem_pages);
	if (!err) err = parse_cmdline(mb_cmdline);
	if (!err) err = check_params(mem_pages);
	if (err) { ev(rdtsc(), "error"); puts(" msg=\""); puts(err); puts("\"\n"); return; }
	calibrate_tsc();
	bg_g = bg_first;
	bg_on = 0; /* not during boot-time fill/use: nothing migrates yet */
	ev(rdtsc(), "boot"); ks("behaviour", bnames[behaviour]); kx("pool", pool); kv("pool_blocks", pool_blocks);
	kv("nblocks", nblocks); kv("reuse", reuse); kv("fill_mb", fill_mb); kx("bg_first", bg_first);
	kx("bg_last", bg_last); kv("rounds", rounds); kv("stale", stale); kv("zero", zero); kv("mem_pages", mem_pages);
	kx("image_first", (u32)image_start >> 12); kx("image_last", ((u32)image_end >> 12) - 1); eol();
	ev(rdtsc(), "calib"); kv("tsc_hz", tsc_hz); ks("src", tsc_calibrated ? "pit" : "guess"); eol();

	u64 t0 = rdtsc();
	/* One record per page is enough to make it a "normal" (non-zero) page for migration; plain
	 * stores are much cheaper than rep stos under this PVM host. */
	for (u64 g = 0x1000; g < 0x1000 + fill_mb * 256; g++)
		stamp(g, MAGIC_FILL, 0, 0);
	ev(t0, "fill"); kx("gfn", 0x1000); kv("npages", fill_mb * 256); kv("t_end", rdtsc()); eol();
	if ((err = balloon_init())) { ev(rdtsc(), "error"); puts(" msg=\""); puts(err); puts("\"\n"); return; }
	use_blocks(0, nblocks, 1);
	bg_on = 1;
	ev(rdtsc(), "ready"); eol();

	u32 last_id = cfg_cmd_id(), ids_seen = 0;
	u64 per_log = udiv64(tsc_hz, 1000, 0) * log_ms, next_log = rdtsc() + per_log, hb = 0;
	ev(rdtsc(), "cfg"); kx("id", last_id); eol();
	for (;;) {
		bg_tick(64);
		u32 id = cfg_cmd_id();
		if (id != last_id) {
			u64 t = rdtsc();
			ev(t, "cfg"); kx("id", id); eol();
			last_id = id;
			if (id >= CMD_ID_MIN) {
				ids_seen++;
				/* Exactly `rounds` hinting rounds: the lab then lets the migration converge,
				 * and no round is cut short by the final stop. */
				if (!rounds || ids_seen <= rounds)
					hint_round_run(id);
				if (bg_on && rounds && ids_seen >= rounds) {
					bg_on = 0;
					ev(rdtsc(), "bg_stop"); kv("pass", bg_pass); kv("seq", seq); eol();
				}
			} else if (id == CMD_ID_DONE) {
				/* Blocks are released here; nothing else in this guest wants them. */
				ev(rdtsc(), "done"); kv("rounds", hint_round); eol();
			}
		}
		u64 now = rdtsc();
		if (now >= next_log) {
			ev(now, "hb"); kv("n", ++hb); kv("seq", seq); kv("bg_pass", bg_pass); kv("bg_on", bg_on);
			kv("used_idx", used_idx()); kv("avail_idx", avail_idx); eol();
			next_log = now + per_log;
		}
	}
}
