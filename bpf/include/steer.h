/* SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0) */
/*
 * steer.h - stages 2 and 4 of the edge program: Regional Services.
 *
 * Included by bpf/edge.c after gen.h and parse.h.
 *
 * stage 2, decap (backbone links, PE_S_DECAP): an IPv4 packet to this DC's
 *   backbone address carrying IPv4 (IPIP) or IPv6 (6in4) loses its outer
 *   header; the inner packet is parsed and filtered like any other and
 *   goes to the stack, which answers the client directly (DSR).
 * stage 4, steer (internet links, PE_S_STEER): a packet that passed the
 *   filter, for a dedicated IP of a region this DC is not in, goes to an
 *   in-region DC: Maglev slot by flow hash, outer IPv4 header (DF, TTL,
 *   checksum), next hop by bpf_fib_lookup, redirect out of the backbone.
 *
 * The outer source is this DC's backbone address, so the backbone carries
 * the client's bytes still encrypted: this DC never terminates the TLS.
 */
#ifndef PE_STEER_H
#define PE_STEER_H

#include "pe_abi.h"
#include "parse.h"
#include "gen.h"

#define PE_AF_INET 2
#define PE_IP_DF 0x4000
#define PE_OUTER_LEN (sizeof(struct ethhdr) + sizeof(struct iphdr))

static __always_inline __u32 rotl32(__u32 x, int r)
{
	return (x << r) | (x >> (32 - r));
}

/* One murmur3 round: cheap, and mixes well enough for a Maglev slot. */
static __always_inline __u32 flow_mix(__u32 h, __u32 k)
{
	k *= 0xcc9e2d51U;
	k = rotl32(k, 15);
	k *= 0x1b873593U;
	h ^= k;
	h = rotl32(h, 13);
	return h * 5 + 0xe6546b64U;
}

/* A flow as the hash sees it: addresses as loaded from the packet. */
struct pe_flow {
	__u32 src[4];
	__u32 dst[4];
	__u32 ports;            /* sport << 16 | dport, host order; 0 without ports */
	__u32 proto;
};

/* The packet's own flow. Fragments go without ports (a later fragment has
 * none), so every fragment of a datagram goes to the same DC. */
static __always_inline void flow_of(struct pe_pkt *p, struct pe_flow *f)
{
	if (p->has_ports && !p->first_frag)
		f->ports = ((__u32)p->sport << 16) | p->dport;
	f->proto = p->l4_proto;
	if (p->l3_proto == ETH_P_IP) {
		f->src[0] = p->saddr4;
		f->dst[0] = p->daddr4;
		return;
	}
	__builtin_memcpy(f->src, &p->saddr6, 16);
	__builtin_memcpy(f->dst, &p->daddr6, 16);
}

static __always_inline int same6(struct in6_addr *a, struct in6_addr *b)
{
	return ((a->in6_u.u6_addr32[0] ^ b->in6_u.u6_addr32[0]) |
		(a->in6_u.u6_addr32[1] ^ b->in6_u.u6_addr32[1]) |
		(a->in6_u.u6_addr32[2] ^ b->in6_u.u6_addr32[2]) |
		(a->in6_u.u6_addr32[3] ^ b->in6_u.u6_addr32[3])) == 0;
}

/*
 * An ICMP error about a packet this network sent belongs to that packet's
 * flow: a router's "fragmentation needed" or "packet too big" for a reply
 * an in-region DC sent by DSR reaches whichever DC is nearest the router,
 * and must go on to the DC that holds the connection, or path MTU
 * discovery breaks. The quoted packet (from the regional IP to the client)
 * is turned around into the client's flow. 1 when *f is that flow.
 */
static __always_inline int quoted_flow(struct xdp_md *ctx, struct pe_pkt *p, struct pe_flow *f)
{
	void *data = (void *)(long)ctx->data, *end = (void *)(long)ctx->data_end;
	void *quoted = data + (p->l4_off & 0x7ff) + PE_ICMP_HDR_LEN;
	__u16 *ports;

	if (p->nonfirst_frag || p->first_frag)
		return 0;
	if (p->l3_proto == ETH_P_IP) {
		struct iphdr *in = quoted;

		/* Destination unreachable, time exceeded, parameter problem. */
		if (p->l4_proto != IPPROTO_ICMP ||
		    (p->icmp_type != 3 && p->icmp_type != 11 && p->icmp_type != 12))
			return 0;
		if ((void *)(in + 1) > end || in->saddr != p->daddr4 || in->ihl < 5)
			return 0;
		f->src[0] = in->daddr;
		f->dst[0] = in->saddr;
		f->proto = in->protocol;
		if (in->frag_off & bpf_htons(PE_IP_OFFSET | PE_IP_MF))
			return 1;
		ports = quoted + in->ihl * 4;
	} else {
		struct ipv6hdr *in = quoted;

		/* Destination unreachable, packet too big, time exceeded, parameter problem. */
		if (p->l4_proto != IPPROTO_ICMPV6 || p->icmp_type < 1 || p->icmp_type > 4)
			return 0;
		if ((void *)(in + 1) > end || !same6(&in->saddr, &p->daddr6))
			return 0;
		__builtin_memcpy(f->src, &in->daddr, 16);
		__builtin_memcpy(f->dst, &in->saddr, 16);
		f->proto = in->nexthdr;
		ports = (void *)(in + 1);
	}
	if ((f->proto == IPPROTO_TCP || f->proto == IPPROTO_UDP) && (void *)(ports + 2) <= end)
		f->ports = ((__u32)bpf_ntohs(ports[1]) << 16) | bpf_ntohs(ports[0]);
	return 1;
}

/* Hash of a flow; agent/flowhash.py is the same function in Python. */
static __always_inline __u32 flow_hash(struct pe_flow *f, int v6)
{
	__u32 h = PE_FLOW_SEED;

	if (!v6) {
		h = flow_mix(h, f->src[0]);
		h = flow_mix(h, f->dst[0]);
	} else {
#pragma unroll
		for (int i = 0; i < 4; i++)
			h = flow_mix(h, f->src[i]);
#pragma unroll
		for (int i = 0; i < 4; i++)
			h = flow_mix(h, f->dst[i]);
	}
	h = flow_mix(h, f->ports);
	h = flow_mix(h, f->proto);
	h ^= h >> 16;
	h *= 0x85ebca6bU;
	h ^= h >> 13;
	h *= 0xc2b2ae35U;
	h ^= h >> 16;
	return h;
}

/* Is this packet a tunnel to this DC that this link should open? */
static __always_inline int tunnel_to_us(struct pe_gen *g, struct pe_pkt *p)
{
	struct pe_steer *s = g->steer;

	return s && (s->flags & PE_S_DECAP) && p->l3_proto == ETH_P_IP &&
	       p->daddr4 == s->bb_addr4 && !p->first_frag && !p->nonfirst_frag &&
	       (p->l4_proto == IPPROTO_IPIP || p->l4_proto == IPPROTO_IPV6);
}

static __always_inline struct pe_svc *service(struct pe_gen *g, struct pe_pkt *p)
{
	void *m;

	if (p->l3_proto == ETH_P_IP) {
		m = pe_svc4_v1.lookup(&g->slot);
		return m ? bpf_map_lookup_elem(m, &p->daddr4) : NULL;
	}
	m = pe_svc6_v1.lookup(&g->slot);
	return m ? bpf_map_lookup_elem(m, &p->daddr6) : NULL;
}

/*
 * Stage 2. Strip Ethernet (and VLAN tags) and the outer IPv4 header, put
 * the Ethernet addresses back in front of the inner packet, and parse that.
 * Returns the inner packet's parse reason (PE_R_PASS to go on),
 * PE_R_DROP_BAD_TUNNEL for a tunnel to this DC inside the tunnel, or
 * PE_R_DROP_TUNNEL_DEST when the inner packet is not for a Regional
 * Services IP of this DC's region.
 */
static __always_inline __u32 stage_decap(struct xdp_md *ctx, struct pe_gen *g, struct pe_pkt *p)
{
	void *data = (void *)(long)ctx->data, *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	__u16 proto = p->l4_proto == IPPROTO_IPIP ? ETH_P_IP : ETH_P_IPV6;
	int strip = p->l4_off - (int)sizeof(*eth);
	__u8 dst[ETH_ALEN], src[ETH_ALEN];
	struct pe_svc *svc;
	__u32 reason;

	if ((void *)(eth + 1) > end)
		return PE_R_DROP_TRUNCATED;
	__builtin_memcpy(dst, eth->h_dest, ETH_ALEN);
	__builtin_memcpy(src, eth->h_source, ETH_ALEN);
	if (bpf_xdp_adjust_head(ctx, strip))
		return PE_R_DROP_BAD_TUNNEL;
	data = (void *)(long)ctx->data;
	end = (void *)(long)ctx->data_end;
	eth = data;
	if ((void *)(eth + 1) > end)
		return PE_R_DROP_TRUNCATED;
	__builtin_memcpy(eth->h_dest, dst, ETH_ALEN);
	__builtin_memcpy(eth->h_source, src, ETH_ALEN);
	eth->h_proto = bpf_htons(proto);

	__builtin_memset(p, 0, sizeof(*p));
	reason = stage_parse(ctx, p);
	if (reason != PE_R_PASS)
		return reason;
	if (tunnel_to_us(g, p))
		return PE_R_DROP_BAD_TUNNEL;
	/* Only steered traffic comes this way: a tunnel to anything but a
	 * dedicated IP of this region would make this DC a relay. */
	svc = service(g, p);
	if (!svc || !g->steer || svc->region != g->steer->region)
		return PE_R_DROP_TUNNEL_DEST;
	return PE_R_PASS;
}

static __always_inline __u16 ipv4_checksum(struct iphdr *ip)
{
	__u16 *w = (__u16 *)ip;
	__u32 sum = 0;

#pragma unroll
	for (int i = 0; i < (int)sizeof(*ip) / 2; i++)
		sum += w[i];
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return ~sum;
}

/*
 * Tunnel the packet to DC number `n` at backbone address `to`. The next hop
 * is looked up before the packet changes, so a failure drops it as it came.
 */
static __always_inline __u32 tunnel_to(struct xdp_md *ctx, struct pe_steer *s,
				       struct pe_pkt *p, __u32 to, __u32 n)
{
	struct bpf_fib_lookup fib = {};
	__u8 proto = p->l3_proto == ETH_P_IP ? IPPROTO_IPIP : IPPROTO_IPV6;
	__u16 len = p->l3_len + sizeof(struct iphdr);
	int grow = (int)PE_OUTER_LEN - (int)p->l3_off;
	struct pe_counter *c;
	struct ethhdr *eth;
	struct iphdr *ip;
	void *end;
	int rc;

	fib.family = PE_AF_INET;
	fib.tos = p->tos;
	fib.l4_protocol = proto;
	fib.tot_len = len;
	fib.ipv4_src = s->bb_addr4;
	fib.ipv4_dst = to;
	fib.ifindex = s->bb_ifindex;
	/* OUTPUT: route as this host would send it, out of the backbone link. */
	rc = bpf_fib_lookup(ctx, &fib, sizeof(fib), BPF_FIB_LOOKUP_OUTPUT);
	if (rc == BPF_FIB_LKUP_RET_FRAG_NEEDED)
		return PE_R_DROP_TOO_BIG;
	if (rc != BPF_FIB_LKUP_RET_SUCCESS)
		return PE_R_DROP_STEER_FAIL;

	if (bpf_xdp_adjust_head(ctx, -grow))
		return PE_R_DROP_STEER_FAIL;
	eth = (void *)(long)ctx->data;
	end = (void *)(long)ctx->data_end;
	ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > end)
		return PE_R_DROP_STEER_FAIL;
	__builtin_memcpy(eth->h_dest, fib.dmac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, fib.smac, ETH_ALEN);
	eth->h_proto = bpf_htons(ETH_P_IP);
	ip->version = 4;
	ip->ihl = 5;
	ip->tos = p->tos;
	ip->tot_len = bpf_htons(len);
	ip->id = 0;             /* DF set: never fragmented, so no id is needed (RFC 6864) */
	ip->frag_off = bpf_htons(PE_IP_DF);
	ip->ttl = PE_TUNNEL_TTL;
	ip->protocol = proto;
	ip->check = 0;
	ip->saddr = s->bb_addr4;
	ip->daddr = to;
	ip->check = ipv4_checksum(ip);

	c = pe_steered_v1.lookup(&n);
	if (c) {
		/* Per-CPU slot: no atomics needed (see record() in edge.c). */
		c->packets += 1;
		c->bytes += len + sizeof(*eth);
	}
	bpf_redirect(fib.ifindex, 0);
	return PE_R_REDIRECT_STEER;
}

/*
 * Stage 4. `reason` is the filter's pass reason; it stays unless the
 * destination is a Regional Services IP.
 */
static __always_inline __u32 stage_steer(struct xdp_md *ctx, struct pe_gen *g,
					 struct pe_pkt *p, __u32 reason)
{
	struct pe_steer *s = g->steer;
	struct pe_flow flow = {};
	struct pe_svc *svc;
	struct pe_dc *dc;
	void *table, *dcs;
	__u32 idx, word, size, n;
	__u64 *w;

	if (!s || !(s->flags & PE_S_STEER))
		return reason;
	svc = service(g, p);
	if (!svc)
		return reason;
	if (svc->region == s->region)
		return PE_R_PASS_IN_REGION;
	size = s->maglev_size;
	table = pe_maglev_v1.lookup(&g->slot);
	dcs = pe_dcs_v1.lookup(&g->slot);
	if (!size || !table || !dcs)
		return PE_R_DROP_NO_REGION_DC;
	if (!quoted_flow(ctx, p, &flow))
		flow_of(p, &flow);
	idx = svc->region * size + flow_hash(&flow, p->l3_proto == ETH_P_IPV6) % size;
	/* Byte slots keep a region's 65537-slot table at 64 KiB, in cache;
	 * array values are 8-byte aligned, so bytes are packed into u64s. */
	word = idx / PE_MAGLEV_PER_WORD;
	w = bpf_map_lookup_elem(table, &word);
	if (!w)
		return PE_R_DROP_NO_REGION_DC;
	n = (*w >> ((idx % PE_MAGLEV_PER_WORD) * 8)) & 0xff;
	if (n == PE_MAGLEV_EMPTY)
		return PE_R_DROP_NO_REGION_DC;
	dc = bpf_map_lookup_elem(dcs, &n);
	if (!dc || !dc->bb_addr4)
		return PE_R_DROP_NO_REGION_DC;
	return tunnel_to(ctx, s, p, dc->bb_addr4, n);
}

#endif /* PE_STEER_H */
