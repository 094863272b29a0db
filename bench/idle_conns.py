#!/usr/bin/env python3
"""RSS per 1,000 idle keep-alive connections: Bosun beside nginx.

Each proxy (one worker, the same reverse-proxy setup as bench/run.sh) gets
N client connections that each send one request, read the response and then
sit idle. The proxy's RSS (its whole process tree) is read before, while the
N connections idle, 2 s after they all close, and with N new ones (whether
what stayed after the close is reused or leaked). Run as root or with nginx
installed: `python3 bench/idle_conns.py [N] [BOSUN_BINARY]`.
"""

import asyncio
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time

N = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
BOSUN = sys.argv[2] if len(sys.argv) > 2 else "target/release/bosun"
UPSTREAM, NGINX, BOSUN_PORT, ADMIN = 18280, 18281, 18282, 18283


def rss_kb(pid):
    pids, total = [pid], 0
    while pids:
        p = pids.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
            with open(f"/proc/{p}/task/{p}/children") as f:
                pids += [int(c) for c in f.read().split()]
        except FileNotFoundError:
            pass
    return total


async def hold(port, n):
    conns = []
    req = f"GET / HTTP/1.1\r\nHost: upstream.bench\r\n\r\n".encode()
    for _ in range(n):
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(req)
        await w.drain()
        head = await r.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.decode().split("\r\n"):
            if line.lower().startswith("content-length:"):
                length = int(line.split(":")[1])
        await r.readexactly(length)
        conns.append((r, w))
    return conns


def wait_port(port, timeout=10):
    import socket
    end = time.time() + timeout
    while time.time() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"port {port} did not open")


def measure(name, pid, port):
    time.sleep(0.5)
    before = rss_kb(pid)

    async def run():
        conns = await hold(port, N)
        await asyncio.sleep(1)
        during = rss_kb(pid)
        for _, w in conns:
            w.close()
        await asyncio.sleep(2)
        after = rss_kb(pid)
        # Again: memory kept after the first round is reused, not leaked.
        conns = await hold(port, N)
        await asyncio.sleep(1)
        again = rss_kb(pid)
        for _, w in conns:
            w.close()
        return during, after, again

    during, after, again = asyncio.run(run())
    per = (during - before) / N * 1000 / 1024
    print(
        f"| {name} | {before / 1024:.1f} | {during / 1024:.1f} | {per:.2f} | {after / 1024:.1f} | {again / 1024:.1f} |"
    )


def main():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    tmp = tempfile.mkdtemp(prefix="bosun-idle.")
    os.chmod(tmp, 0o755)
    procs = []
    try:
        up = os.path.join(tmp, "up")
        os.makedirs(up)
        with open(os.path.join(up, "nginx.conf"), "w") as f:
            f.write(
                f"daemon off; worker_processes 1; pid {up}/pid; error_log {up}/err.log;\n"
                "events { worker_connections 1024; }\n"
                f"http {{ access_log off; client_body_temp_path {up}; proxy_temp_path {up};"
                f" fastcgi_temp_path {up}; uwsgi_temp_path {up}; scgi_temp_path {up};\n"
                f" server {{ listen 127.0.0.1:{UPSTREAM}; location / {{ return 200 \"ok\\n\"; }} }} }}\n"
            )
        procs.append(subprocess.Popen(["nginx", "-p", up, "-c", f"{up}/nginx.conf"]))
        wait_port(UPSTREAM)

        px = os.path.join(tmp, "px")
        os.makedirs(px)
        with open(os.path.join(px, "nginx.conf"), "w") as f:
            f.write(
                f"daemon off; worker_processes 1; pid {px}/pid; error_log {px}/err.log;\n"
                f"events {{ worker_connections {N + 512}; }}\n"
                f"http {{ access_log off; keepalive_timeout 600s; client_body_temp_path {px};"
                f" proxy_temp_path {px}; fastcgi_temp_path {px}; uwsgi_temp_path {px}; scgi_temp_path {px};\n"
                f" upstream u {{ server 127.0.0.1:{UPSTREAM}; keepalive 64; }}\n"
                f" server {{ listen 127.0.0.1:{NGINX}; location / {{ proxy_pass http://u;"
                " proxy_http_version 1.1; proxy_set_header Connection \"\"; } } }\n"
            )
        nginx = subprocess.Popen(["nginx", "-p", px, "-c", f"{px}/nginx.conf"])
        procs.append(nginx)
        wait_port(NGINX)

        cfg = os.path.join(tmp, "bosun")
        os.makedirs(cfg)
        with open(os.path.join(cfg, "bench.yaml"), "w") as f:
            f.write(
                "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: bench, namespace: bench}\n"
                f"spec:\n  selector: {{istio: ingressgateway}}\n  servers:\n  - port: {{number: {BOSUN_PORT}, name: http, protocol: HTTP}}\n    hosts: [\"*\"]\n"
                "---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: upstream, namespace: bench}\n"
                "spec:\n  hosts: [upstream.bench]\n  resolution: STATIC\n  ports: [{number: 80, name: http, protocol: HTTP}]\n"
                f"  endpoints: [{{address: 127.0.0.1, ports: {{http: {UPSTREAM}}}}}]\n"
                "---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: upstream, namespace: bench}\n"
                "spec:\n  hosts: [\"*\"]\n  gateways: [bench]\n  http:\n  - route: [{destination: {host: upstream.bench}}]\n"
            )
        bosun = subprocess.Popen(
            [BOSUN, "proxy", "--mode", "gateway", "--config", cfg, "--gateway-address", "127.0.0.1",
             "--admin-address", f"127.0.0.1:{ADMIN}", "--workers", "1", "--idle-timeout", "600s",
             "--request-head-timeout", "600s"],
            stderr=subprocess.DEVNULL,
        )
        procs.append(bosun)
        wait_port(BOSUN_PORT)

        print(f"{N} idle keep-alive connections (each after one request), RSS in MB:\n")
        print("| proxy | before | with the idle connections | per 1,000 | 2 s after they close | with them again |")
        print("|---|---|---|---|---|---|")
        measure("nginx", nginx.pid, NGINX)
        measure("bosun", bosun.pid, BOSUN_PORT)
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
