/* SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0) */
/*
 * parse.h - stage 1 of the edge program: parse the headers the filter needs.
 *
 * Included by bpf/edge.c. A cursor moves through the frame; every helper
 * checks its own bounds and returns the next protocol (>= 0) or a negated
 * drop reason (< 0). stage_parse() fills struct pe_pkt and returns
 * PE_R_PASS when the filter may look at the packet, or the reason to stop.
 */
#ifndef PE_PARSE_H
#define PE_PARSE_H

#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/in6.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/tcp.h>
#include <uapi/linux/udp.h>

#include "pe_abi.h"

#define PE_ETH_P_8021Q 0x8100
#define PE_ETH_P_8021AD 0x88A8
#define PE_IP_OFFSET 0x1FFF
#define PE_IP_MF 0x2000
#define PE_IP6_OFFSET 0xFFF8
#define PE_ICMP_HDR_LEN 8

/* What the filter stage reads; everything in host order but addresses. */
struct pe_pkt {
	__u32 len;              /* frame length, for byte counters */
	__u16 l3_proto;         /* ETH_P_IP or ETH_P_IPV6 */
	__u8 l4_proto;          /* IPPROTO_* after the extension headers */
	__u8 nonfirst_frag;     /* 1: a later fragment, no L4 header here */
	__u8 first_frag;        /* 1: first fragment, must hold the whole L4 header */
	__u8 has_ports;         /* 1: sport/dport are valid (TCP, UDP) */
	__u8 tcp_syn;           /* 1: TCP SYN without ACK */
	__u16 sport;
	__u16 dport;
	__u8 tos;               /* IPv4 TOS / IPv6 traffic class */
	__u8 hop_limit;         /* IPv6 hop limit (neighbour discovery needs 255) */
	__u8 icmp_type;         /* ICMP / ICMPv6 type, when l4_proto is one */
	__u16 l3_off;           /* offset of the IP header in the frame */
	__u16 l4_off;           /* offset of the header after the IP header(s) */
	__u16 l3_len;           /* IP packet length from its header (frame padding excluded) */
	__u32 saddr4;           /* network order */
	__u32 daddr4;
	struct in6_addr saddr6;
	struct in6_addr daddr6;
};

struct pe_cursor {
	void *start;
	void *pos;
	void *end;
};

struct pe_vlan_hdr {
	__be16 tci;
	__be16 encap_proto;
};

struct pe_ext_hdr {
	__u8 nexthdr;
	__u8 hdrlen;
	__u8 data[6];
};

/* Ethernet and up to PE_VLAN_MAX tags; returns the inner EtherType. */
static __always_inline int parse_eth(struct pe_cursor *c)
{
	struct ethhdr *eth = c->pos;

	if ((void *)(eth + 1) > c->end)
		return -PE_R_DROP_TRUNCATED;
	c->pos = eth + 1;
	__u16 proto = bpf_ntohs(eth->h_proto);

#pragma unroll
	for (int i = 0; i < PE_VLAN_MAX; i++) {
		if (proto != PE_ETH_P_8021Q && proto != PE_ETH_P_8021AD)
			return proto;
		struct pe_vlan_hdr *vh = c->pos;
		if ((void *)(vh + 1) > c->end)
			return -PE_R_DROP_TRUNCATED;
		c->pos = vh + 1;
		proto = bpf_ntohs(vh->encap_proto);
	}
	if (proto == PE_ETH_P_8021Q || proto == PE_ETH_P_8021AD)
		return -PE_R_DROP_VLAN_DEPTH;
	return proto;
}

/* IPv4 header with options; *l4_len gets the IP payload length. */
static __always_inline int parse_ipv4(struct pe_cursor *c, struct pe_pkt *p, __u32 *l4_len)
{
	struct iphdr *ip = c->pos;

	if ((void *)(ip + 1) > c->end)
		return -PE_R_DROP_TRUNCATED;
	if (ip->version != 4)
		return -PE_R_DROP_BAD_VERSION;
	__u32 hlen = ip->ihl * 4;
	if (hlen < sizeof(*ip))
		return -PE_R_DROP_BAD_IHL;
	if (c->pos + hlen > c->end)
		return -PE_R_DROP_TRUNCATED;
	__u32 tot = bpf_ntohs(ip->tot_len);
	if (tot < hlen || c->pos + tot > c->end)
		return -PE_R_DROP_BAD_LENGTH;

	p->saddr4 = ip->saddr;
	p->daddr4 = ip->daddr;
	p->tos = ip->tos;
	p->l3_len = tot;
	p->l4_proto = ip->protocol;
	__u16 frag = bpf_ntohs(ip->frag_off);
	if (frag & PE_IP_OFFSET) {
		/* RFC 1858: offset 1 can only serve to overwrite TCP flags. */
		if ((frag & PE_IP_OFFSET) == 1 && ip->protocol == IPPROTO_TCP)
			return -PE_R_DROP_BAD_FRAGMENT;
		p->nonfirst_frag = 1;
	} else if (frag & PE_IP_MF) {
		p->first_frag = 1;
	}
	c->pos += hlen;
	p->l4_off = c->pos - c->start;
	*l4_len = tot - hlen;
	return ip->protocol;
}

/*
 * IPv6 header and its extension chain (hop-by-hop first, routing,
 * destination options, fragment, AH) up to PE_IPV6_EXT_MAX headers.
 * *l4_len gets what the payload length leaves for the L4 header.
 */
static __always_inline int parse_ipv6(struct pe_cursor *c, struct pe_pkt *p, __u32 *l4_len)
{
	struct ipv6hdr *ip6 = c->pos;

	if ((void *)(ip6 + 1) > c->end)
		return -PE_R_DROP_TRUNCATED;
	if (ip6->version != 6)
		return -PE_R_DROP_BAD_VERSION;
	__u32 plen = bpf_ntohs(ip6->payload_len);
	c->pos = ip6 + 1;
	if (c->pos + plen > c->end)
		return -PE_R_DROP_BAD_LENGTH;
	void *payload_end = c->pos + plen;
	__builtin_memcpy(&p->saddr6, &ip6->saddr, sizeof(p->saddr6));
	__builtin_memcpy(&p->daddr6, &ip6->daddr, sizeof(p->daddr6));
	p->tos = (ip6->priority << 4) | (ip6->flow_lbl[0] >> 4);
	p->l3_len = sizeof(*ip6) + plen;
	p->hop_limit = ip6->hop_limit;

	__u8 next = ip6->nexthdr;
#pragma unroll
	for (int i = 0; i < PE_IPV6_EXT_MAX; i++) {
		struct pe_ext_hdr *eh = c->pos;
		__u32 len;

		switch (next) {
		case IPPROTO_HOPOPTS:
			if (i != 0)
				return -PE_R_DROP_BAD_EXTHDR;
			/* fallthrough */
		case IPPROTO_ROUTING:
		case IPPROTO_DSTOPTS:
			if ((void *)(eh + 1) > c->end)
				return -PE_R_DROP_TRUNCATED;
			len = (eh->hdrlen + 1) * 8;
			break;
		case IPPROTO_AH:
			if ((void *)(eh + 1) > c->end)
				return -PE_R_DROP_TRUNCATED;
			len = (eh->hdrlen + 2) * 4;
			break;
		case IPPROTO_FRAGMENT:
			if ((void *)(eh + 1) > c->end)
				return -PE_R_DROP_TRUNCATED;
			len = 8;
			/* data[0..1]: offset (13 bits) and flags */
			if ((((__u16)eh->data[0] << 8) | eh->data[1]) & PE_IP6_OFFSET)
				p->nonfirst_frag = 1;
			else
				p->first_frag = 1;
			break;
		default:
			goto done;
		}
		if (c->pos + len > payload_end)
			return -PE_R_DROP_BAD_LENGTH;
		next = eh->nexthdr;
		c->pos += len;
		if (p->nonfirst_frag)
			goto done;
	}
	switch (next) {
	case IPPROTO_HOPOPTS:
	case IPPROTO_ROUTING:
	case IPPROTO_DSTOPTS:
	case IPPROTO_AH:
	case IPPROTO_FRAGMENT:
		return -PE_R_DROP_EXTHDR_DEPTH;
	}
done:
	p->l4_proto = next;
	p->l4_off = c->pos - c->start;
	*l4_len = payload_end - c->pos;
	return next;
}

/* TCP, UDP, ICMP and ICMPv6 headers; other protocols carry no ports. */
static __always_inline int parse_l4(struct pe_cursor *c, struct pe_pkt *p, __u32 l4_len)
{
	/* A first fragment must hold the whole L4 header (RFC 1858, RFC 7112):
	 * cut short there it is an evasion attempt, elsewhere a truncation. */
	int short_reason = p->first_frag ? -PE_R_DROP_BAD_FRAGMENT : -PE_R_DROP_TRUNCATED;

	switch (p->l4_proto) {
	case IPPROTO_TCP: {
		struct tcphdr *th = c->pos;
		if ((void *)(th + 1) > c->end || l4_len < sizeof(*th))
			return short_reason;
		__u32 doff = th->doff * 4;
		if (doff < sizeof(*th))
			return -PE_R_DROP_BAD_L4;
		if (doff > l4_len)
			return short_reason;
		p->sport = bpf_ntohs(th->source);
		p->dport = bpf_ntohs(th->dest);
		p->has_ports = 1;
		p->tcp_syn = th->syn && !th->ack;
		return 0;
	}
	case IPPROTO_UDP: {
		struct udphdr *uh = c->pos;
		if ((void *)(uh + 1) > c->end || l4_len < sizeof(*uh))
			return short_reason;
		__u32 ulen = bpf_ntohs(uh->len);
		/* In a first fragment the length covers the whole datagram. */
		if (ulen < sizeof(*uh) || (ulen > l4_len && !p->first_frag))
			return -PE_R_DROP_BAD_L4;
		p->sport = bpf_ntohs(uh->source);
		p->dport = bpf_ntohs(uh->dest);
		p->has_ports = 1;
		return 0;
	}
	case IPPROTO_ICMP:
	case IPPROTO_ICMPV6:
		if (c->pos + PE_ICMP_HDR_LEN > c->end || l4_len < PE_ICMP_HDR_LEN)
			return short_reason;
		p->icmp_type = *(__u8 *)c->pos;
		return 0;
	}
	return 0;
}

/*
 * Stage 1. Returns PE_R_PASS when *p describes an IP packet the filter
 * should judge, PE_R_PASS_NOT_IP for other EtherTypes, or a drop reason.
 */
static __always_inline int stage_parse(struct xdp_md *ctx, struct pe_pkt *p)
{
	struct pe_cursor c = {
		.start = (void *)(long)ctx->data,
		.pos = (void *)(long)ctx->data,
		.end = (void *)(long)ctx->data_end,
	};
	__u32 l4_len = 0;
	int rc;

	p->len = c.end - c.pos;
	rc = parse_eth(&c);
	if (rc < 0)
		return -rc;
	p->l3_proto = rc;
	p->l3_off = c.pos - c.start;
	if (rc == ETH_P_IP)
		rc = parse_ipv4(&c, p, &l4_len);
	else if (rc == ETH_P_IPV6)
		rc = parse_ipv6(&c, p, &l4_len);
	else
		return PE_R_PASS_NOT_IP;
	if (rc < 0)
		return -rc;
	if (p->nonfirst_frag)
		return PE_R_PASS;
	rc = parse_l4(&c, p, l4_len);
	return rc < 0 ? -rc : PE_R_PASS;
}

#endif /* PE_PARSE_H */
