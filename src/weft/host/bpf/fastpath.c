// SPDX-License-Identifier: GPL-2.0
/* weft's tc fast path for overlay <-> overlay IPv4 and IPv6 traffic (host-gw; vxlan after
 * decap).
 *
 *   from_container  tc ingress of a container's host-side veth (the container's egress):
 *                   FIB lookup, then bpf_redirect_neigh() to the next hop's device, past
 *                   the host's IP stack (prerouting, forward, netfilter, qdisc of the veth).
 *                   On a veth that is a port of the CNI bridge (the `bridge` map says
 *                   which), only a frame addressed to the bridge (routed, not bridged) is
 *                   taken, as if it arrived on the bridge: before the bridge, and so before
 *                   br_netfilter runs every bridged packet through the IP hooks.
 *   from_underlay   tc ingress of the underlay device: a packet for a local container whose
 *                   device is a veth (in the `peers` map, kept by the agent) goes straight
 *                   into the container's namespace with bpf_redirect_peer(); other overlay
 *                   packets for this host go by bpf_redirect_neigh().
 *
 * Anything else -- neither IPv4 nor IPv6, a source or destination not in a leased subnet, a
 * source arriving where its route back does not leave, IPv4 options or an IPv6 extension
 * header (even a fragment header), TTL / hop limit about to expire, a route the FIB cannot
 * resolve -- is passed on (PASS) and takes
 * the normal path, where netfilter drops and counts what it must, so turning this on never
 * loses a packet the kernel would carry nor carries one weft's rules would drop.
 *
 * Nothing in the object depends on the network: the agent writes the leased subnets into
 * each attached copy's maps, and until it has, no packet matches. So one object, built
 * with the package or at first start, serves every host.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#define AF_INET 2
#define AF_INET6 10
/* Not ours to carry: on to the next filter on the device (another tool's, if any), then
 * the stack. TC_ACT_OK would end the device's filter chain here. */
#define PASS TC_ACT_UNSPEC

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u32);   /* ifindex of a container's host-side veth */
	__type(value, __u8);
} peers SEC(".maps");

/* Leased subnets (this host's and its peers'), kept by the agent: a packet takes the fast
 * path only if its source is in one, as the ingress filter's `spoofed_source` rule asks
 * (weft.host.ingress_rules), and its destination too (overlay to overlay: the traffic
 * weft leaves untracked and unNATed); others go on to netfilter, which drops and counts
 * what it must. */
struct subnet_key {
	__u32 prefixlen;
	__be32 addr;
};
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct subnet_key);
	__type(value, __u8);
} subnets SEC(".maps");

/* The same for the IPv6 half of a dual-stack network, or an IPv6 overlay. */
struct subnet6_key {
	__u32 prefixlen;
	__u8 addr[16];
};
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct subnet6_key);
	__type(value, __u8);
} subnets6 SEC(".maps");

/* On a bridge port: the bridge's ifindex and MAC (index 0), kept by the agent; zero on
 * every other device. */
struct bridge_port {
	__u32 ifindex;
	__u8 mac[ETH_ALEN];
	__u8 pad[2];
};
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct bridge_port);
} bridge SEC(".maps");

/* Packets sent on the fast path, per program (index 0: from_container,
 * 1: from_underlay); what `weft status` shows. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 2);
	__type(key, __u32);
	__type(value, __u64);
} redirected SEC(".maps");

static __always_inline int leased(__be32 addr)
{
	struct subnet_key key = { .prefixlen = 32, .addr = addr };
	return bpf_map_lookup_elem(&subnets, &key) != 0;
}

static __always_inline int leased6(const struct in6_addr *addr)
{
	struct subnet6_key key = { .prefixlen = 128 };
	__builtin_memcpy(key.addr, addr, sizeof(key.addr));
	return bpf_map_lookup_elem(&subnets6, &key) != 0;
}

static __always_inline int same_mac(const __u8 *a, const __u8 *b)
{
	return ((a[0] ^ b[0]) | (a[1] ^ b[1]) | (a[2] ^ b[2]) | (a[3] ^ b[3]) |
		(a[4] ^ b[4]) | (a[5] ^ b[5])) == 0;
}

static __always_inline void count(__u32 which)
{
	__u64 *n = bpf_map_lookup_elem(&redirected, &which);
	if (n)
		*n += 1;
}

/* RFC 1624 incremental checksum update for TTL - 1, as the kernel's ip_decrease_ttl. */
static __always_inline void decrease_ttl(struct iphdr *iph)
{
	__u32 check = iph->check;
	check += bpf_htons(0x0100);
	iph->check = (__sum16)(check + (check >= 0xFFFF));
	iph->ttl--;
}

/* Where the FIB sent it: to a local container's veth by bpf_redirect_peer (from the
 * underlay, the neighbour resolved), else by bpf_redirect_neigh. */
static __always_inline int redirect(struct __sk_buff *skb, struct ethhdr *eth,
				    struct bpf_fib_lookup *fib, int rc, __u8 family,
				    int from_underlay)
{
	if (from_underlay && rc == BPF_FIB_LKUP_RET_SUCCESS &&
	    bpf_map_lookup_elem(&peers, &fib->ifindex)) {
		__builtin_memcpy(eth->h_dest, fib->dmac, ETH_ALEN);
		__builtin_memcpy(eth->h_source, fib->smac, ETH_ALEN);
		count(1);
		return bpf_redirect_peer(fib->ifindex, 0);
	}
	count(from_underlay);
	if (fib->family != family) /* an IPv4 route via an IPv6 next hop (RFC 5549) */
		return bpf_redirect_neigh(fib->ifindex, 0, 0, 0);
	/* The next hop the lookup chose (the gateway, or the destination itself on a direct
	 * route): given to the helper, it skips the route lookup it would otherwise do again
	 * per packet (ip_route_output_flow; a fifth FIB lookup on a 2-host path, in `perf` on
	 * the bench). The neighbour is still resolved and kept by the kernel's neighbour code,
	 * as with no next hop given, so a missing or stale entry heals. */
	struct bpf_redir_neigh nh = {};
	if (family == AF_INET) {
		nh.nh_family = AF_INET;
		nh.ipv4_nh = fib->ipv4_dst;
	} else {
		nh.nh_family = AF_INET6;
		__builtin_memcpy(nh.ipv6_nh, fib->ipv6_dst, sizeof(nh.ipv6_nh));
	}
	return bpf_redirect_neigh(fib->ifindex, &nh, sizeof(nh), 0);
}

static __always_inline int forward4(struct __sk_buff *skb, struct ethhdr *eth, void *end,
				    __u32 in, int from_underlay)
{
	struct iphdr *iph = (void *)(eth + 1);
	struct bpf_fib_lookup fib = {};
	int rc;

	if ((void *)(iph + 1) > end)
		return PASS;
	if (iph->ihl != 5 || iph->ttl <= 1)
		return PASS;
	if (!leased(iph->saddr) || !leased(iph->daddr))
		return PASS;
	/* The strict reverse-path check of the ingress filter: the route back to the source
	 * leaves by the device the packet came in on, or the stack (and nft) decides. */
	fib.family = AF_INET;
	fib.ipv4_src = iph->daddr;
	fib.ipv4_dst = iph->saddr;
	fib.ifindex = in;
	rc = bpf_fib_lookup(skb, &fib, sizeof(fib), 0); /* SKIP_NEIGH: Linux 6.3+ only */
	if ((rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH) ||
	    fib.ifindex != in)
		return PASS;

	__builtin_memset(&fib, 0, sizeof(fib));
	fib.family = AF_INET;
	fib.tos = iph->tos;
	fib.l4_protocol = iph->protocol;
	/* tot_len stays 0: then the kernel checks the skb itself against the egress MTU,
	 * GSO-aware (is_skb_forwardable). A tot_len makes it compare the IP header's length,
	 * and every GSO packet (up to 64 KB) would read as too big and take the slow path. */
	fib.ipv4_src = iph->saddr;
	fib.ipv4_dst = iph->daddr;
	fib.ifindex = in;
	rc = bpf_fib_lookup(skb, &fib, sizeof(fib), 0);
	if (rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH)
		return PASS; /* local delivery, unreachable, forwarding off: the stack decides */
	if (fib.ifindex == in)
		return PASS; /* hairpin: leave it to the stack (redirects, ICMP) */

	decrease_ttl(iph);
	return redirect(skb, eth, &fib, rc, AF_INET, from_underlay);
}

/* IPv6: the same checks. No extension header is parsed: a packet with one (hop-by-hop
 * options every router must process, a fragment header, ...) is left to the stack, like
 * IPv4 options; "no next header" (59) and every upper protocol go, as IPv4's do. No header
 * checksum to update. */
static __always_inline int forward6(struct __sk_buff *skb, struct ethhdr *eth, void *end,
				    __u32 in, int from_underlay)
{
	struct ipv6hdr *ip6h = (void *)(eth + 1);
	struct bpf_fib_lookup fib = {};
	int rc;

	if ((void *)(ip6h + 1) > end)
		return PASS;
	if (ip6h->hop_limit <= 1)
		return PASS;
	switch (ip6h->nexthdr) {
	case IPPROTO_HOPOPTS:  /* every router's to process */
	case IPPROTO_ROUTING:
	case IPPROTO_FRAGMENT:
	case IPPROTO_AH:
	case IPPROTO_DSTOPTS:
	case IPPROTO_MH:
	case 139:  /* HIP */
	case 140:  /* Shim6 */
	case 253:  /* experimental (RFC 3692) */
	case 254:
		return PASS; /* an extension header: the stack's, like IPv4 options */
	}
	if (!leased6(&ip6h->saddr) || !leased6(&ip6h->daddr))
		return PASS;
	/* The strict reverse-path check, as for IPv4. */
	fib.family = AF_INET6;
	__builtin_memcpy(fib.ipv6_src, &ip6h->daddr, sizeof(fib.ipv6_src));
	__builtin_memcpy(fib.ipv6_dst, &ip6h->saddr, sizeof(fib.ipv6_dst));
	fib.ifindex = in;
	rc = bpf_fib_lookup(skb, &fib, sizeof(fib), 0);
	if ((rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH) ||
	    fib.ifindex != in)
		return PASS;

	__builtin_memset(&fib, 0, sizeof(fib));
	fib.family = AF_INET6;
	/* The traffic class and flow label, as the stack's lookup (ip6_flowinfo). tot_len
	 * stays 0: see IPv4. */
	fib.flowinfo = *(__be32 *)ip6h & bpf_htonl(0x0FFFFFFF);
	fib.l4_protocol = ip6h->nexthdr;
	__builtin_memcpy(fib.ipv6_src, &ip6h->saddr, sizeof(fib.ipv6_src));
	__builtin_memcpy(fib.ipv6_dst, &ip6h->daddr, sizeof(fib.ipv6_dst));
	fib.ifindex = in;
	rc = bpf_fib_lookup(skb, &fib, sizeof(fib), 0);
	if (rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH)
		return PASS; /* local delivery, unreachable, forwarding off: the stack decides */
	if (fib.ifindex == in)
		return PASS; /* hairpin: leave it to the stack (redirects, ICMP) */

	ip6h->hop_limit--;
	return redirect(skb, eth, &fib, rc, AF_INET6, from_underlay);
}

static __always_inline int forward(struct __sk_buff *skb, int from_underlay)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	/* Where the packet counts as arriving: its device, or the bridge of a bridge port. */
	__u32 in = skb->ingress_ifindex;

	if ((void *)(eth + 1) > end)
		return PASS;
	if (!from_underlay) {
		__u32 zero = 0;
		struct bridge_port *port = bpf_map_lookup_elem(&bridge, &zero);

		if (port && port->ifindex) {
			if (!same_mac(eth->h_dest, port->mac))
				return PASS; /* bridged to a neighbour, not routed: the bridge's */
			in = port->ifindex;
		}
	}
	if (eth->h_proto == bpf_htons(ETH_P_IP))
		return forward4(skb, eth, end, in, from_underlay);
	if (eth->h_proto == bpf_htons(ETH_P_IPV6))
		return forward6(skb, eth, end, in, from_underlay);
	return PASS;
}

SEC("tc/from_container")
int from_container(struct __sk_buff *skb)
{
	return forward(skb, 0);
}

SEC("tc/from_underlay")
int from_underlay(struct __sk_buff *skb)
{
	return forward(skb, 1);
}

char _license[] SEC("license") = "GPL";
