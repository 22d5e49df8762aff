/* SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0) */
/*
 * srcgen.h - the benchmark's source addresses, computed, never looked up.
 *
 * Included by bench/bpf/shim.c (test runs) and bench/bpf/gen.c (veth
 * generator); bench/denylist.py builds the same list in numpy. Entry i of
 * the synthetic denylist is mix(i) with its first octet made even, at a
 * prefix length chosen by i % 100 (80% /32, 5% /28, 12% /24, 3% /20).
 * Denied sources: a random entry, random host bits. Passing sources: a
 * random address with an odd first octet, which no entry covers.
 */
#ifndef PE_BENCH_SRCGEN_H
#define PE_BENCH_SRCGEN_H

#define SRC_FIXED 0       /* leave the frame's source alone */
#define SRC_DENIED 1      /* a random address inside a random entry */
#define SRC_CLEAN 2       /* a random address no entry covers */
#define SRC_DENIED_32 3   /* ... inside a random /32 entry */
#define SRC_DENIED_28 4   /* ... inside a random /28 entry */
#define SRC_DENIED_NET 5  /* ... inside a random /24 or /20 entry */

static __always_inline __u32 srcgen_mix(__u32 i)
{
	__u32 x = i * 0x9E3779B1U;

	x ^= x >> 16;
	x *= 0x85EBCA6BU;
	x ^= x >> 13;
	return x;
}

static __always_inline __u32 srcgen_plen(__u32 i)
{
	__u32 r = i % 100;

	return r < 90 ? 32 : r < 91 ? 28 : r < 98 ? 24 : 20;
}

/* A random entry index, of the class `mode` asks for. */
static __always_inline __u32 srcgen_index(__u32 mode, __u32 n)
{
	__u32 hundreds = n / 100 ? n / 100 : 1;
	__u32 base = (bpf_get_prandom_u32() % hundreds) * 100;
	__u32 r = bpf_get_prandom_u32();

	switch (mode) {
	case SRC_DENIED_32:
		return base + r % 90;
	case SRC_DENIED_28:
		return base + 90;
	case SRC_DENIED_NET:
		return base + 91 + r % 9;
	}
	return r % n;
}

/* Host-order source for this packet; `n` entries in the list. */
static __always_inline __u32 srcgen_pick(__u32 mode, __u32 n)
{
	__u32 rnd = bpf_get_prandom_u32();

	if (mode == SRC_CLEAN)
		return rnd | 0x01000000U;
	__u32 i = srcgen_index(mode, n);
	__u32 plen = srcgen_plen(i);
	__u32 mask = plen == 32 ? 0xFFFFFFFFU : ~((1U << (32 - plen)) - 1);

	return ((srcgen_mix(i) & ~0x01000000U) & mask) | (rnd & ~mask);
}

struct srcgen_cfg {
	__u32 mode;
	__u32 entries;
	__u32 ifindex;          /* gen.c: redirect target */
	__u32 _pad;
};

#endif
