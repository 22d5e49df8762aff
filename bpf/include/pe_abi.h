/* SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0) */
/*
 * pe_abi.h - the one definition of everything the edge program and the
 * agent share: map keys and values, enums, layout constants.
 *
 * Included by bpf/edge.c, bpf/root.c and the ABI probe (tests/unit); the
 * Python mirror is agent/abi.py, proven equal by tests/unit/test_abi.py and
 * by a size check when the agent loads. Only <linux/types.h> types, explicit
 * padding, and a size assert on every struct.
 *
 * A layout change bumps PE_LAYOUT_VERSION: it is part of every pinned map's
 * name, so an old pin is never read with a new layout.
 */
#ifndef PE_ABI_H
#define PE_ABI_H

#include <linux/types.h>

#define PE_LAYOUT_VERSION 1

/*
 * Why a packet got its verdict. Append only: a retired number stays
 * retired, so counters keep their meaning across versions. The verdict is
 * in the name (PASS_*, DROP_*); agent/abi.py derives it from there.
 */
enum pe_reason {
	PE_R_PASS = 0,              /* passed every filter */
	PE_R_PASS_ALLOW = 1,        /* allowlisted source; a filter drop was overridden */
	PE_R_PASS_NOT_IP = 2,       /* neither IPv4 nor IPv6 (ARP, LLDP): the stack decides */
	PE_R_PASS_FRAGMENT = 3,     /* non-first fragment: address checks only, no ports */
	PE_R_PASS_NO_RULES = 4,     /* no rule generation installed (never after start) */
	PE_R_PASS_NO_PROGRAM = 5,   /* root program: the edge program slot was empty */
	PE_R_DROP_TRUNCATED = 6,    /* a header runs past the end of the frame */
	PE_R_DROP_BAD_IHL = 7,      /* IPv4 header length under 20 bytes */
	PE_R_DROP_BAD_LENGTH = 8,   /* IP total/payload length disagrees with the frame */
	PE_R_DROP_BAD_VERSION = 9,  /* IP version field disagrees with the EtherType */
	PE_R_DROP_VLAN_DEPTH = 10,  /* more than PE_VLAN_MAX VLAN tags */
	PE_R_DROP_EXTHDR_DEPTH = 11, /* IPv6 extension chain longer than PE_IPV6_EXT_MAX */
	PE_R_DROP_BAD_EXTHDR = 12,  /* hop-by-hop options not first in the chain */
	PE_R_DROP_BAD_FRAGMENT = 13, /* first fragment without its L4 header, or tiny offset */
	PE_R_DROP_BAD_L4 = 14,      /* TCP data offset under 5, UDP length out of range */
	PE_R_DROP_DENYLIST = 15,    /* source on the denylist */
	PE_R_DROP_BOGON = 16,       /* bogon or martian source on a public interface */
	PE_R_DROP_L4_RULE = 17,     /* an L4 rule (protocol, ports) said drop */
	PE_R_DROP_RATE_SYN = 18,    /* source over its TCP SYN token bucket */
	PE_R_DROP_RATE_UDP = 19,    /* source over its UDP token bucket */
	PE_R_PASS_DECAP = 20,       /* tunnelled to this DC from the backbone: inner packet to the stack */
	PE_R_PASS_IN_REGION = 21,   /* for a Regional Services IP of this DC's own region */
	PE_R_REDIRECT_STEER = 22,   /* Regional Services IP of another region: tunnelled to an in-region DC */
	PE_R_DROP_NO_REGION_DC = 23, /* Regional Services IP whose region has no DC in the table */
	PE_R_DROP_STEER_FAIL = 24,  /* no headroom, no route or no neighbour towards the in-region DC */
	PE_R_DROP_TOO_BIG = 25,     /* the tunnelled packet would exceed the backbone MTU */
	PE_R_DROP_BAD_TUNNEL = 26,  /* a tunnel inside a tunnel to this DC */
	PE_R_DROP_TUNNEL_DEST = 27, /* tunnelled, but not to a Regional Services IP of this DC's region */
	PE_R__COUNT = 28,
};

/* Counter slots: room to append reasons without a layout bump. */
#define PE_REASON_MAX 64

/* Bit r set: reason r comes with XDP_DROP (every other reason passes).
 * Kept next to the enum; the ABI test checks it against the names. */
#define PE_DROP_REASONS (((1ULL << (PE_R_DROP_RATE_UDP + 1)) - (1ULL << PE_R_DROP_TRUNCATED)) | \
			 ((1ULL << PE_R__COUNT) - (1ULL << PE_R_DROP_NO_REGION_DC)))
/* Bit r set: reason r comes with XDP_REDIRECT (bpf_redirect() was called). */
#define PE_REDIRECT_REASONS (1ULL << PE_R_REDIRECT_STEER)

/* One counter slot per reason, in a per-CPU array (pe_stats). */
struct pe_counter {
	__u64 packets;
	__u64 bytes;
};
_Static_assert(sizeof(struct pe_counter) == 16, "pe_counter");

/* Parse bounds (verifier loops are bounded by these). */
#define PE_VLAN_MAX 2
#define PE_IPV6_EXT_MAX 6

/*
 * Rule generations. Every rule map is an inner map of an outer
 * ARRAY_OF_MAPS with PE_GEN_SLOTS slots; pe_active says which slot packets
 * use. A new generation is filled in the idle slot and goes live with one
 * write of pe_active (agent/generation.py).
 */
#define PE_GEN_SLOTS 2

struct pe_active {
	__u32 slot;             /* 0 or 1: the live slot */
	__u32 _pad;
	__u64 generation;       /* id of the live generation, for status */
};
_Static_assert(sizeof(struct pe_active) == 16, "pe_active");

/* pe_params.flags */
#define PE_F_BOGONS (1U << 0)   /* drop bogon sources: this is a public interface */

/* A token bucket kept as GCRA: one theoretical arrival time per source. */
struct pe_rate {
	__u64 interval_ns;      /* 1e9 / packets per second; 0 = no limit */
	__u64 burst_ns;         /* interval_ns * burst: how far ahead a source may run */
};
_Static_assert(sizeof(struct pe_rate) == 16, "pe_rate");

/* The one-entry parameters map of a generation. */
struct pe_params {
	__u64 generation;
	__u32 flags;            /* PE_F_* */
	__u32 exact_shift;      /* 32 - log2(buckets of the exact table) */
	__u32 l4_drop_rules;    /* bit i set: L4 rule i drops; clear: it passes */
	__u32 _pad;
	struct pe_rate syn;     /* TCP SYN (without ACK) per source */
	struct pe_rate udp;     /* UDP per source */
};
_Static_assert(sizeof(struct pe_params) == 56, "pe_params");

/*
 * IPv4 source summary: 2 bits per /24, 32 /24s per u64 word, so the whole
 * IPv4 space is 2^19 words (4 MiB, in L3). Most packets need only this.
 */
#define PE_SUM_BITS 2
#define PE_SUM_WORD_SHIFT 13            /* addr >> 13 = word index */
#define PE_SUM_WORDS (1U << 19)

enum pe_sum_state {
	PE_SUM_CLEAN = 0,       /* no rule mentions this /24 */
	PE_SUM_DENY = 1,        /* the whole /24 is denied, nothing else inside */
	PE_SUM_EXACT = 2,       /* only exact /32 denies inside: the exact table decides */
	PE_SUM_SLOW = 3,        /* anything else: exact table, then the LPM tries */
};

/*
 * Exact IPv4 /32 denies: bucketised cuckoo hash in an mmapable array, so a
 * bucket is one aligned 64-byte cache line. An address lives in bucket
 * h1 unless h1 is full, then in h2. 0 marks a free slot (0.0.0.0/32 goes to
 * the LPM trie instead).
 */
#define PE_EXACT_SLOTS 16
#define PE_EXACT_MUL1 0x9E3779B1U
#define PE_EXACT_MUL2 0x85EBCA77U
#define PE_EXACT_XOR2 0x5BD1E995U
#define PE_EXACT_MIN_SHIFT 6    /* at most 2^26 buckets */
#define PE_EXACT_MAX_SHIFT 26   /* at least 64 buckets */

struct pe_exact_bucket {
	__u32 slot[PE_EXACT_SLOTS];     /* host byte order addresses */
};
_Static_assert(sizeof(struct pe_exact_bucket) == 64, "pe_exact_bucket");

/* LPM trie keys; addresses in network byte order, as the trie compares bits. */
struct pe_lpm4_key {
	__u32 prefixlen;
	__u32 addr;
};
_Static_assert(sizeof(struct pe_lpm4_key) == 8, "pe_lpm4_key");

struct pe_lpm6_key {
	__u32 prefixlen;
	__u8 addr[16];
};
_Static_assert(sizeof(struct pe_lpm6_key) == 20, "pe_lpm6_key");

struct pe_lpm_val {
	__u64 expires_ns;       /* CLOCK_MONOTONIC deadline; 0 = never */
};
_Static_assert(sizeof(struct pe_lpm_val) == 8, "pe_lpm_val");

/*
 * L4 rules as bit vectors: entry [class * 65536 + port] holds the rules
 * whose source range and whose destination range contain that port. The
 * first rule (lowest bit) set in both wins. Protocols other than TCP and
 * UDP use class OTHER with the protocol number as "port" on both sides.
 */
#define PE_L4_RULES_MAX 32
#define PE_L4_PORTS 65536U

enum pe_l4_class {
	PE_L4_TCP = 0,
	PE_L4_UDP = 1,
	PE_L4_OTHER = 2,
	PE_L4__CLASSES = 3,
};

struct pe_l4_ports {
	__u32 src_rules;
	__u32 dst_rules;
};
_Static_assert(sizeof(struct pe_l4_ports) == 8, "pe_l4_ports");

/* Rate limiter state: LRU hash, shared by all CPUs (updated with CAS). */
enum pe_rl_kind {
	PE_RL_SYN = 1,
	PE_RL_UDP = 2,
};

struct pe_rl_key {
	__u32 addr[4];          /* IPv4 as ::ffff:a.b.c.d; IPv6 by /64 */
	__u32 kind;             /* enum pe_rl_kind */
};
_Static_assert(sizeof(struct pe_rl_key) == 20, "pe_rl_key");

struct pe_rl_val {
	__u64 tat_ns;           /* GCRA theoretical arrival time */
};
_Static_assert(sizeof(struct pe_rl_val) == 8, "pe_rl_val");

/*
 * Regional Services steering (include/steer.h). A dedicated IP of a zone
 * with a region maps to that region's index; a DC outside the region
 * picks an in-region DC from the region's Maglev table (maglev_size slots,
 * a prime, at region * maglev_size) by a hash of the flow, and tunnels
 * the packet there in IPv4 (IPIP, or 6in4 for IPv6) over the backbone.
 */
#define PE_REGIONS_MAX 16
#define PE_DCS_MAX 255                  /* DC numbers are bytes; 255 is EMPTY */
#define PE_MAGLEV_EMPTY 0xFF            /* a slot of a region without DCs */
#define PE_MAGLEV_PER_WORD 8            /* one-byte slots, 8 to a u64 map value */
#define PE_TUNNEL_TTL 64
#define PE_FLOW_SEED 0x5E2D58D8U        /* agent/flowhash.py hashes the same way */

/* pe_steer.flags */
#define PE_S_STEER (1U << 0)    /* tunnel other regions' traffic: an internet-facing link */
#define PE_S_DECAP (1U << 1)    /* decapsulate tunnels to bb_addr4: a backbone link */

/* This DC as one generation sees it: one-entry array. */
struct pe_steer {
	__u32 flags;            /* PE_S_* */
	__u32 region;           /* this DC's region index */
	__u32 bb_addr4;         /* this DC's backbone address, network order */
	__u32 bb_ifindex;       /* the backbone link: FIB lookups and redirects use it */
	__u32 maglev_size;      /* slots per region: a prime */
	__u32 _pad;
};
_Static_assert(sizeof(struct pe_steer) == 24, "pe_steer");

/* A DC a Maglev slot names (array indexed by DC number). */
struct pe_dc {
	__u32 bb_addr4;         /* backbone address, network order; 0 = no such DC */
	__u32 region;
};
_Static_assert(sizeof(struct pe_dc) == 8, "pe_dc");

/* A Regional Services dedicated IP (hash value, keyed by address). */
struct pe_svc {
	__u32 region;           /* region index, < PE_REGIONS_MAX */
	__u32 _pad;
};
_Static_assert(sizeof(struct pe_svc) == 8, "pe_svc");

struct pe_addr6 {
	__u8 addr[16];
};
_Static_assert(sizeof(struct pe_addr6) == 16, "pe_addr6");

/* Program array slots of the root program. */
enum pe_prog_slot {
	PE_PROG_EDGE = 0,
	PE_PROG__SLOTS = 4,
};

#endif /* PE_ABI_H */
