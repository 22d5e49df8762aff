/* SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0) */
/*
 * lpm.c - the obvious design, for comparison: one LPM trie of every
 * denied IPv4 prefix, looked up for each packet's source.
 */
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>

struct lpm_key {
	__u32 prefixlen;
	__u32 addr;
};

BPF_F_TABLE("lpm_trie", struct lpm_key, __u8, lpm_deny, LPM_ENTRIES, BPF_F_NO_PREALLOC);

int bench_lpm(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data, *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = data + sizeof(*eth);

	if ((void *)(ip + 1) > end)
		return XDP_DROP;
	if (eth->h_proto != bpf_htons(ETH_P_IP))
		return XDP_PASS;
	struct lpm_key key = { .prefixlen = 32, .addr = ip->saddr };

	return lpm_deny.lookup(&key) ? XDP_DROP : XDP_PASS;
}
