# A private DHT of libtorrent sessions (DHT only), for pluresdb-sync's tests and benchmarks.
#
#   python3 libtorrent_dht.py NODES IP
#
# Starts NODES libtorrent sessions listening on IP (port 0: the OS picks), with settings that
# let nodes on one private address talk (no IP restrictions, no rate limits for one IP, no
# public bootstrap routers, no LSD/UPnP/NAT-PMP), bootstraps each from all the others, then
# prints one line:
#
#   BOOTSTRAP ip:port,ip:port,...
#
# and, until stdin closes, one line per DHT packet between a libtorrent node and any endpoint
# that is not one of them:
#
#   PKT <ms since start> <libtorrent port> <in|out> <ip:port> <y> <q> <ro> <id> <nodes>
#
# y is the KRPC kind (q, r, e), q the query method (or -), ro 1 when the message carries
# ro=1 (BEP 43), id the sender's node id in hex (or -), nodes the ip:port of each node a
# reply lists (comma-separated, or -). Nothing here reaches outside IP.
import select
import sys
import time

import libtorrent as lt


def field(message, *path):
    for key in path:
        if not isinstance(message, dict):
            return None
        message = message.get(key)
    return message


def text(value):
    if isinstance(value, bytes):
        return value.decode("latin-1")
    return "-" if value is None else str(value)


def describe(message):
    kind = text(field(message, b"y"))
    method = text(field(message, b"q"))
    ro = "1" if field(message, b"ro") == 1 else "0"
    node_id = field(message, b"a", b"id") if kind == "q" else field(message, b"r", b"id")
    node_id = node_id.hex() if isinstance(node_id, bytes) else "-"
    compact = field(message, b"r", b"nodes")
    nodes = []
    if isinstance(compact, bytes):
        # 26 bytes each: a 20-byte id, 4 bytes of IPv4 address, 2 of port.
        for i in range(0, len(compact) - 25, 26):
            addr = compact[i + 20 : i + 26]
            port = int.from_bytes(addr[4:6], "big")
            nodes.append(f"{addr[0]}.{addr[1]}.{addr[2]}.{addr[3]}:{port}")
    return kind, method, ro, node_id, ",".join(nodes) or "-"



def main():
    count, ip = int(sys.argv[1]), sys.argv[2]
    settings = {
        "listen_interfaces": f"{ip}:0",
        "enable_dht": True,
        "dht_bootstrap_nodes": "",
        "enable_lsd": False,
        "enable_upnp": False,
        "enable_natpmp": False,
        "dht_restrict_routing_ips": False,
        "dht_restrict_search_ips": False,
        "dht_prefer_verified_node_ids": False,
        "dht_enforce_node_id": False,
        "dht_ignore_dark_internet": False,
        "dht_block_ratelimit": 1000000,
        "dht_upload_rate_limit": 100000000,
        "alert_mask": lt.alert.category_t.dht_log_notification,
    }
    sessions = [lt.session(settings) for _ in range(count)]
    ports = [s.listen_port() for s in sessions]
    for session, port in zip(sessions, ports):
        for other in ports:
            if other != port:
                session.add_dht_node((ip, other))
    # Ready once every node has the others in its routing table (at most 10 s).
    deadline = time.time() + 10
    while time.time() < deadline:
        for s in sessions:
            s.post_dht_stats()
        time.sleep(0.05)
        known = []
        for s in sessions:
            nodes = 0
            for a in s.pop_alerts():
                if isinstance(a, lt.dht_stats_alert):
                    nodes = sum(b["num_nodes"] for b in a.routing_table)
            known.append(nodes)
        if all(n >= count - 1 for n in known):
            break
    print("BOOTSTRAP " + ",".join(f"{ip}:{p}" for p in ports), flush=True)
    own = {f"{ip}:{p}" for p in ports}
    started = time.time()
    while True:
        readable, _, _ = select.select([sys.stdin], [], [], 0.005)
        if readable and not sys.stdin.readline():
            return
        for port, s in zip(ports, sessions):
            for a in s.pop_alerts():
                if not isinstance(a, lt.dht_pkt_alert):
                    continue
                # The message reads "<== [ip:port] ..." (incoming) or "==> [ip:port] ...".
                msg = a.message()
                direction = "in" if msg.startswith("<==") else "out"
                peer = msg[msg.find("[") + 1 : msg.find("]")]
                if peer in own:
                    continue
                try:
                    kind, method, ro, node_id, nodes = describe(lt.bdecode(a.pkt_buf))
                except Exception:
                    kind, method, ro, node_id, nodes = "?", "-", "0", "-", "-"
                ms = int((time.time() - started) * 1000)
                print(
                    f"PKT {ms} {port} {direction} {peer} {kind} {method} {ro} {node_id} {nodes}",
                    flush=True,
                )


main()
