# Sourced by the slow-link benchmarks: two network namespaces of our own (client $NS,
# server $SNS) joined by a veth pair ($VETH-a on the server side, $VETH-b on the client
# side) whose ends are rate-limited with tc tbf. Needs NS, SNS, SRV_IP, CLI_IP and VETH set.

# link_create: the namespaces, the veth pair, addresses.
link_create() {
  ip netns add "$NS"
  ip netns add "$SNS"
  ip -n "$NS" link set lo up
  ip -n "$SNS" link set lo up
  ip link add "${VETH}a" netns "$SNS" type veth peer name "${VETH}b" netns "$NS"
  ip -n "$SNS" addr add "$SRV_IP/24" dev "${VETH}a"
  ip -n "$NS" addr add "$CLI_IP/24" dev "${VETH}b"
  # An Ethernet MTU: tbf drops packets larger than its burst.
  ip -n "$SNS" link set "${VETH}a" mtu 1500 up
  ip -n "$NS" link set "${VETH}b" mtu 1500 up
}

# link_rate RATE: tbf at RATE (tc syntax: 384kbit, 2mbit) on both ends.
link_rate() {
  tc -n "$SNS" qdisc replace dev "${VETH}a" root tbf rate "$1" burst 32kb latency 200ms
  tc -n "$NS" qdisc replace dev "${VETH}b" root tbf rate "$1" burst 32kb latency 200ms
}

# link_delete: the namespaces (and with them the veth pair).
link_delete() {
  ip netns del "$NS" 2>/dev/null || true
  ip netns del "$SNS" 2>/dev/null || true
}
