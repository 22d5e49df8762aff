/* SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0) */
/*
 * filter.h - stage 3 of the edge program: drop attack traffic by address.
 *
 * Included by bpf/edge.c after pe_maps.h and parse.h. Order: denylist,
 * bogons, L4 rules, rate limits; the first that says drop names the
 * reason, and an allowlisted source overrides any of them. The allowlist is
 * consulted only on that drop path, so passing traffic never pays for it.
 *
 * IPv4 sources meet the exact /32 table first, then the /24 summary, and a
 * trie only for the few /24s that need one: one or two cache lines for
 * nearly every packet. bpf/README.md says why it is shaped this way.
 */
#ifndef PE_FILTER_H
#define PE_FILTER_H

#include "pe_abi.h"
#include "parse.h"
#include "gen.h"

/* Deny LPM entries carry an expiry; the agent stores in each entry the
 * latest expiry of every entry containing it, so the longest match alone
 * answers for the whole chain. */
static __always_inline int lpm_deny_hit(void *lpm, void *key)
{
	struct pe_lpm_val *v;

	if (!lpm)
		return 0;
	v = bpf_map_lookup_elem(lpm, key);
	return v && (!v->expires_ns || v->expires_ns > bpf_ktime_get_ns());
}

static __always_inline int lpm_member(void *lpm, void *key)
{
	return lpm && bpf_map_lookup_elem(lpm, key);
}

/* Is `a` in one bucket? Two slots per u64 word: a 32-bit lane of
 * (word ^ aa) is zero exactly where the slot holds `a` (SWAR zero test),
 * and no branch per slot keeps the verifier's path count flat. */
static __always_inline int exact4_bucket_has(struct pe_exact_bucket *b, __u32 a)
{
	__u64 aa = ((__u64)a << 32) | a, acc = 0;
	__u64 *w = (__u64 *)b->slot;

#pragma unroll
	for (int i = 0; i < PE_EXACT_SLOTS / 2; i++) {
		__u64 x = w[i] ^ aa;
		acc |= (x - 0x0000000100000001ULL) & ~x;
	}
	return (acc & 0x8000000080000000ULL) != 0;
}

/* The second bucket: it holds spill-over only while the first is full. */
static __always_inline int exact4_h2_has(struct pe_gen *g, void *tab, __u32 a)
{
	__u32 h = ((a ^ PE_EXACT_XOR2) * PE_EXACT_MUL2) >> g->params->exact_shift;
	struct pe_exact_bucket *b = bpf_map_lookup_elem(tab, &h);

	return b && exact4_bucket_has(b, a);
}

/* Is `a` (host order) an exact /32 deny? One bucket for nearly all. */
static __always_inline int exact4_has(struct pe_gen *g, __u32 a)
{
	void *tab = pe_d4exact_v1.lookup(&g->slot);
	__u32 h = (a * PE_EXACT_MUL1) >> g->params->exact_shift;
	struct pe_exact_bucket *b;

	/* 0.0.0.0 would match empty slots; it lives in the trie instead. */
	if (!tab || !a)
		return 0;
	b = bpf_map_lookup_elem(tab, &h);
	if (!b)
		return 0;
	if (exact4_bucket_has(b, a))
		return 1;
	return b->slot[PE_EXACT_SLOTS - 1] && exact4_h2_has(g, tab, a);
}

/*
 * IPv4 denylist. Most sources of a spoofed flood from a reputation list are
 * denied /32s, so the exact table is asked first: one cache line decides
 * them. The compiler keeps allowlisted addresses out of that table, so a
 * hit needs nothing more (*state then says EXACT, which is not SLOW, so
 * the allowlist is not consulted). Everything else goes by the source's /24
 * in the summary: nothing more, or the trie for SLOW /24s.
 */
static __always_inline int deny4(struct pe_gen *g, struct pe_pkt *p, __u32 *state)
{
	struct pe_lpm4_key key = { .prefixlen = 32, .addr = p->saddr4 };
	__u32 a = bpf_ntohl(p->saddr4);
	__u32 idx = a >> PE_SUM_WORD_SHIFT;
	void *sum, *lpm;
	__u64 *word = NULL;

	if (exact4_has(g, a)) {
		*state = PE_SUM_EXACT;
		return 1;
	}
	sum = pe_d4sum_v1.lookup(&g->slot);
	if (sum)
		word = bpf_map_lookup_elem(sum, &idx);
	*state = word ? (*word >> (((a >> 8) & 31) * PE_SUM_BITS)) & 3 : PE_SUM_SLOW;
	switch (*state) {
	case PE_SUM_DENY:
		return 1;
	case PE_SUM_SLOW:
		lpm = pe_d4lpm_v1.lookup(&g->slot);
		return lpm_deny_hit(lpm, &key);
	}
	return 0;       /* CLEAN, or EXACT and not in the table */
}

static __always_inline int deny6(struct pe_gen *g, struct pe_pkt *p)
{
	struct pe_lpm6_key key = { .prefixlen = 128 };
	void *lpm = pe_d6lpm_v1.lookup(&g->slot);

	__builtin_memcpy(key.addr, &p->saddr6, sizeof(key.addr));
	return lpm_deny_hit(lpm, &key);
}

/* Is the source in one of two tries (IPv4, IPv6)? */
static __always_inline int source_in(void *lpm4, void *lpm6, struct pe_pkt *p)
{
	struct pe_lpm4_key k4 = { .prefixlen = 32, .addr = p->saddr4 };
	struct pe_lpm6_key k6 = { .prefixlen = 128 };

	if (p->l3_proto == ETH_P_IP)
		return lpm_member(lpm4, &k4);
	__builtin_memcpy(k6.addr, &p->saddr6, sizeof(k6.addr));
	return lpm_member(lpm6, &k6);
}

/* Bogon and allowlisted /24s are SLOW in the summary, so an IPv4 source in
 * any other /24 is in neither list, and needs no lookup to say so. */
static __always_inline int may_be_listed(struct pe_pkt *p, __u32 state)
{
	return p->l3_proto != ETH_P_IP || state == PE_SUM_SLOW;
}

/* IPv6 neighbour discovery (RFC 4861: ICMPv6 133-137) comes from
 * link-local sources, with hop limit 255, which only a sender on this link
 * can set. It is never a bogon, or IPv6 would stop on a public link. */
static __always_inline int on_link_nd(struct pe_pkt *p)
{
	return p->l3_proto == ETH_P_IPV6 && p->l4_proto == IPPROTO_ICMPV6 &&
	       p->hop_limit == 255 && p->icmp_type >= 133 && p->icmp_type <= 137;
}

static __always_inline int bogon(struct pe_gen *g, struct pe_pkt *p, __u32 state)
{
	void *lpm4, *lpm6;

	if (!(g->params->flags & PE_F_BOGONS) || !may_be_listed(p, state) || on_link_nd(p))
		return 0;
	lpm4 = pe_b4lpm_v1.lookup(&g->slot);
	lpm6 = pe_b6lpm_v1.lookup(&g->slot);
	return source_in(lpm4, lpm6, p);
}

static __always_inline int allowed(struct pe_gen *g, struct pe_pkt *p, __u32 state)
{
	void *lpm4, *lpm6;

	if (!may_be_listed(p, state))
		return 0;
	lpm4 = pe_a4lpm_v1.lookup(&g->slot);
	lpm6 = pe_a6lpm_v1.lookup(&g->slot);
	return source_in(lpm4, lpm6, p);
}

/* First L4 rule matching protocol and ports; 1 if it drops. */
static __always_inline int l4_rule_drops(struct pe_gen *g, struct pe_pkt *p)
{
	void *ports = pe_l4ports_v1.lookup(&g->slot);
	struct pe_l4_ports *ps, *pd;
	__u32 cls, si, di, m;

	if (!ports)
		return 0;
	if (p->has_ports) {
		cls = p->l4_proto == IPPROTO_TCP ? PE_L4_TCP : PE_L4_UDP;
		si = cls * PE_L4_PORTS + p->sport;
		di = cls * PE_L4_PORTS + p->dport;
	} else if (p->l4_proto != IPPROTO_TCP && p->l4_proto != IPPROTO_UDP) {
		si = di = PE_L4_OTHER * PE_L4_PORTS + p->l4_proto;
	} else {
		return 0;       /* a later TCP/UDP fragment: no ports to match */
	}
	ps = bpf_map_lookup_elem(ports, &si);
	pd = bpf_map_lookup_elem(ports, &di);
	if (!ps || !pd)
		return 0;
	m = ps->src_rules & pd->dst_rules;
	m &= -m;
	return (m & g->params->l4_drop_rules) != 0;
}

/*
 * GCRA token bucket: a source may run burst_ns ahead of its rate. The
 * state is shared by all CPUs, so it moves by compare-and-swap; a lost
 * race is retried once and then counted as a pass (never a false drop).
 */
static __always_inline int rate_exceeded(struct pe_pkt *p, struct pe_rate *r, __u32 kind)
{
	struct pe_rl_key key = { .kind = kind };
	struct pe_rl_val *v;
	__u64 now, tat, next;

	if (!r->interval_ns)
		return 0;
	if (p->l3_proto == ETH_P_IP) {
		key.addr[2] = bpf_htonl(0xffff);
		key.addr[3] = p->saddr4;
	} else {
		/* IPv6 sources are limited per /64: one host owns at least that. */
		__builtin_memcpy(key.addr, &p->saddr6, 8);
	}
	now = bpf_ktime_get_ns();
	v = pe_rl_v1.lookup(&key);
	if (!v) {
		struct pe_rl_val init = { .tat_ns = now + r->interval_ns };
		pe_rl_v1.update(&key, &init);
		return 0;
	}
#pragma unroll
	for (int i = 0; i < 2; i++) {
		tat = *(volatile __u64 *)&v->tat_ns;
		next = (tat > now ? tat : now) + r->interval_ns;
		if (next - now > r->burst_ns)
			return 1;
		if (__sync_val_compare_and_swap(&v->tat_ns, tat, next) == tat)
			return 0;
	}
	return 0;
}

/* Stage 3. Returns PE_R_PASS or the reason to drop (or PE_R_PASS_*). */
static __always_inline __u32 stage_filter(struct pe_gen *g, struct pe_pkt *p)
{
	__u32 state = PE_SUM_CLEAN, reason = PE_R_PASS;

	if (p->l3_proto == ETH_P_IP) {
		if (deny4(g, p, &state))
			reason = PE_R_DROP_DENYLIST;
	} else if (deny6(g, p)) {
		reason = PE_R_DROP_DENYLIST;
	}
	if (reason == PE_R_PASS && bogon(g, p, state))
		reason = PE_R_DROP_BOGON;
	if (reason == PE_R_PASS && l4_rule_drops(g, p))
		reason = PE_R_DROP_L4_RULE;
	if (reason == PE_R_PASS) {
		if (p->tcp_syn && rate_exceeded(p, &g->params->syn, PE_RL_SYN))
			reason = PE_R_DROP_RATE_SYN;
		else if (p->l4_proto == IPPROTO_UDP && rate_exceeded(p, &g->params->udp, PE_RL_UDP))
			reason = PE_R_DROP_RATE_UDP;
	}
	if (reason != PE_R_PASS)
		return allowed(g, p, state) ? PE_R_PASS_ALLOW : reason;
	return p->nonfirst_frag ? PE_R_PASS_FRAGMENT : PE_R_PASS;
}

#endif /* PE_FILTER_H */
