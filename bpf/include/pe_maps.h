/* SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0) */
/*
 * pe_maps.h - every map the XDP programs use, pinned under PE_PIN_DIR.
 *
 * Included by bpf/edge.c and bpf/root.c (kernel side only; bcc syntax).
 * The agent passes PE_PIN_DIR and the sizes as -D flags. bcc creates and
 * pins the plain maps on first load and reopens them afterwards; the outer
 * ARRAY_OF_MAPS maps are created by the agent (agent/generation.py) because
 * their inner-map template must come with them.
 */
#ifndef PE_MAPS_H
#define PE_MAPS_H

#include "pe_abi.h"

#ifndef PE_PIN_DIR
#error "PE_PIN_DIR must name the interface's bpffs state directory"
#endif
#ifndef PE_RL_ENTRIES
#define PE_RL_ENTRIES 65536
#endif

#define PE_PIN(name) PE_PIN_DIR "/" #name

/* Packets and bytes per reason. Per-CPU: written without atomics (XDP runs
 * in softirq on one CPU at a time); the agent sums the CPUs. */
BPF_TABLE_PINNED("percpu_array", __u32, struct pe_counter, pe_stats_v1,
		 PE_REASON_MAX, PE_PIN(pe_stats_v1));

/* Which generation slot is live. One entry, written only by the agent. */
BPF_TABLE_PINNED("array", __u32, struct pe_active, pe_active_v1, 1,
		 PE_PIN(pe_active_v1));

/* Rate limiter: GCRA state per (source, kind). LRU so a spoofed flood
 * evicts old sources instead of failing inserts; sized from config. */
BPF_TABLE_PINNED("lru_hash", struct pe_rl_key, struct pe_rl_val, pe_rl_v1,
		 PE_RL_ENTRIES, PE_PIN(pe_rl_v1));

/* Program array of the root program: slot PE_PROG_EDGE holds the edge
 * program; an upgrade is one update of that slot. */
BPF_TABLE_PINNED("prog", __u32, __u32, pe_progs_v1, PE_PROG__SLOTS,
		 PE_PIN(pe_progs_v1));

/* Packets and bytes tunnelled to each DC (by DC number), for status:
 * which in-region DC this one hands a regional zone's flows to. */
BPF_TABLE_PINNED("percpu_array", __u32, struct pe_counter, pe_steered_v1,
		 PE_DCS_MAX, PE_PIN(pe_steered_v1));

/*
 * Rule generations: outer arrays of PE_GEN_SLOTS inner maps each, one outer
 * per kind of rule map. Written by the agent only. Inner map specs (type,
 * key, value, capacity) live in agent/maps.py, built from pe_abi.h types.
 */
#define PE_OUTER(name) \
	BPF_TABLE_PINNED("array_of_maps", __u32, __u32, name, PE_GEN_SLOTS, PE_PIN(name))

PE_OUTER(pe_params_v1);   /* ARRAY[1] of struct pe_params */
PE_OUTER(pe_d4sum_v1);    /* ARRAY[PE_SUM_WORDS] of __u64: the /24 summary */
PE_OUTER(pe_d4exact_v1);  /* ARRAY[buckets] of struct pe_exact_bucket */
PE_OUTER(pe_d4lpm_v1);    /* LPM pe_lpm4_key -> pe_lpm_val: denies the summary sends here */
PE_OUTER(pe_d6lpm_v1);    /* LPM pe_lpm6_key -> pe_lpm_val: IPv6 denies */
PE_OUTER(pe_a4lpm_v1);    /* LPM: IPv4 allowlist */
PE_OUTER(pe_a6lpm_v1);    /* LPM: IPv6 allowlist */
PE_OUTER(pe_b4lpm_v1);    /* LPM: IPv4 bogons (checked only on SLOW /24s) */
PE_OUTER(pe_b6lpm_v1);    /* LPM: IPv6 bogons */
PE_OUTER(pe_l4ports_v1);  /* ARRAY[3 * 65536] of struct pe_l4_ports */
PE_OUTER(pe_steer_v1);    /* ARRAY[1] of struct pe_steer: this DC, this link */
PE_OUTER(pe_dcs_v1);      /* ARRAY[PE_DCS_MAX] of struct pe_dc */
PE_OUTER(pe_svc4_v1);     /* HASH __u32 (network order) -> struct pe_svc */
PE_OUTER(pe_svc6_v1);     /* HASH struct pe_addr6 -> struct pe_svc */
PE_OUTER(pe_maglev_v1);   /* ARRAY of __u64: 8 one-byte DC numbers each, PE_REGIONS_MAX tables */

#endif /* PE_MAPS_H */
