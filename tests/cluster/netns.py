"""A small private network for tests: `hosts` network namespaces, each with its own address (10.77.0.1, .2, ...)
on eth0, joined by a bridge that lives in a namespace of its own (the "switch").

Nothing connects it to this machine's own network: a process started in one of its hosts can reach only the other
hosts' addresses (and its own loopback), so traffic between them crosses a real network path (veth pairs and a
bridge) and nothing else. The switch namespace has no firewall rules, whatever the machine's own are. Names carry
this process's id, so concurrent test runs do not collide; down() removes everything up() made.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import uuid

SUBNET = "10.77.0"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=check)


def unavailable() -> str:
    """Why namespaces cannot be had here ("" when they can): not root, no `ip`, or the kernel refuses."""
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add)"
    if shutil.which("ip") is None:
        return "no `ip` command (Debian: apt-get install iproute2)"
    probe = f"psrvprobe{os.getpid()}"
    r = _ip("netns", "add", probe, check=False)
    if r.returncode != 0:
        return f"`ip netns add` failed: {r.stderr.strip()} (no CAP_NET_ADMIN in this container?)"
    _ip("netns", "del", probe, check=False)
    return ""


class Network:
    def __init__(self, hosts: int):
        tag = uuid.uuid4().hex[:6]
        self.switch = f"psrv{tag}sw"
        self.names = [f"psrv{tag}h{i}" for i in range(hosts)]
        self.addresses = [f"{SUBNET}.{i + 1}" for i in range(hosts)]
        self.made: list[str] = []

    def up(self) -> "Network":
        try:
            for ns in (self.switch, *self.names):
                _ip("netns", "add", ns)
                self.made.append(ns)
            _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.switch, "link", "set", "br0", "up")
            for i, (ns, addr) in enumerate(zip(self.names, self.addresses)):
                _ip("link", "add", f"port{i}", "netns", self.switch, "type", "veth", "peer", "name", "eth0",
                    "netns", ns)
                _ip("-n", self.switch, "link", "set", f"port{i}", "master", "br0", "up")
                _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
                _ip("-n", ns, "link", "set", "eth0", "up")
                _ip("-n", ns, "link", "set", "lo", "up")
        except subprocess.CalledProcessError as e:
            self.down()
            raise RuntimeError(f"setting up the test network failed: {' '.join(e.cmd)}: {e.stderr}") from None
        return self

    def prefix(self, host: int) -> list[str]:
        """The command that runs a command in host `host`'s namespace."""
        return ["ip", "netns", "exec", self.names[host]]

    def pids(self) -> list[int]:
        """Processes still running in any of the network's namespaces."""
        out = []
        for ns in self.made:
            r = _ip("netns", "pids", ns, check=False)
            out += [int(p) for p in r.stdout.split()]
        return out

    def down(self) -> None:
        """Remove every namespace (and with them the veth pairs and the bridge). Processes still inside are
        killed first: a namespace with a process in it outlives its name."""
        for pid in self.pids():
            try:
                os.kill(pid, 9)
            except OSError:
                pass
        for ns in reversed(self.made):
            _ip("netns", "del", ns, check=False)
        self.made.clear()

    def __enter__(self) -> "Network":
        return self.up()

    def __exit__(self, *exc) -> None:
        self.down()
