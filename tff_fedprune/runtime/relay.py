"""Runs TFF's `worker_binary` unreachable from the network, behind a relay.

TFF's `worker_binary` always listens on every interface, unauthenticated,
and runs whatever TensorFlow graph a client sends. This script (standard
library and `cryptography` only, run as a file so that it starts without
importing TFF) puts the binary in a private network namespace of its own,
where its port exists only on a loopback interface nobody else can reach, and
relays bytes to that port from one front end:

* `--socket=PATH`: a Unix socket with owner-only permissions (the local
  runtime; gRPC clients reach it as `unix:PATH`);
* `--tls_port=N --tls_cert=... --tls_key=... --tls_client_ca=...`: a TCP port
  in the host's namespace speaking TLS with client certificates (mutual TLS,
  ALPN h2) that accepts only clients whose certificate the given CA signed.

  python relay.py (--socket=PATH | --tls_port=N ...) -- WORKER_BINARY [ARGS]

The namespace is an unprivileged user namespace plus a network namespace
(`unshare(CLONE_NEWUSER | CLONE_NEWNET)`, own uid mapped to root inside), so
no privilege is needed where the kernel allows unprivileged user namespaces.
The binary gets `--port=8000` inside the namespace. The first line on stdout
is `ready`, or `unavailable: REASON` (exit 3) when the kernel refuses the
namespace (the caller decides what to do; nothing was started), or
`error: REASON` (exit 1); with `--tls_port` (the worker service) those two
go to stderr as one `error:` line instead. A TLS client must present a
certificate with the clientAuth extended key usage.
The binary dies with the relay and the relay with its parent
(`PR_SET_PDEATHSIG`, set by the caller).
"""

import argparse
import ctypes
import fcntl
import os
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

SERVER_AUTH = ExtendedKeyUsageOID.SERVER_AUTH
CLIENT_AUTH = ExtendedKeyUsageOID.CLIENT_AUTH

CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
_PR_SET_PDEATHSIG = 1
_SIOCGIFFLAGS, _SIOCSIFFLAGS, _IFF_UP = 0x8913, 0x8914, 0x1
INNER_PORT = 8000
_CHUNK = 1 << 20


def allows(certificate: x509.Certificate, usage: x509.ObjectIdentifier):
  """Whether the certificate's extended key usage names `usage` (one without
  the extension allows nothing here: it predates the rule)."""
  try:
    usages = certificate.extensions.get_extension_for_class(
        x509.ExtendedKeyUsage).value
  except x509.ExtensionNotFound:
    return False
  return usage in usages


def enter_private_network() -> None:
  """Moves this (single-threaded) process into new user and net namespaces."""
  libc = ctypes.CDLL('libc.so.6', use_errno=True)
  uid, gid = os.getuid(), os.getgid()
  if libc.unshare(CLONE_NEWUSER | CLONE_NEWNET) != 0:
    raise PermissionError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
  with open('/proc/self/setgroups', 'w') as f:
    f.write('deny')
  with open('/proc/self/uid_map', 'w') as f:
    f.write(f'0 {uid} 1')
  with open('/proc/self/gid_map', 'w') as f:
    f.write(f'0 {gid} 1')
  with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
    request = struct.pack('16sH14s', b'lo', 0, b'')
    flags = struct.unpack('16sH14s', fcntl.ioctl(s, _SIOCGIFFLAGS, request))[1]
    fcntl.ioctl(s, _SIOCSIFFLAGS,
                struct.pack('16sH14s', b'lo', flags | _IFF_UP, b''))


def _die_with_parent():
  ctypes.CDLL('libc.so.6').prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _wait_for_port(port: int, process: subprocess.Popen, timeout_s: float):
  deadline = time.monotonic() + timeout_s
  while time.monotonic() < deadline:
    if process.poll() is not None:
      raise RuntimeError(f'worker_binary exited with {process.returncode}')
    try:
      socket.create_connection(('127.0.0.1', port), timeout=1).close()
      return
    except OSError:
      time.sleep(0.05)
  raise RuntimeError(f'worker_binary did not listen within {timeout_s:.0f} s')


def _pump(source: socket.socket, sink: socket.socket) -> None:
  try:
    while data := source.recv(_CHUNK):
      sink.sendall(data)
  except OSError:
    pass
  finally:
    for s in (source, sink):
      try:
        s.close()
      except OSError:
        pass


def _relay(client: socket.socket, tls: ssl.SSLContext = None) -> None:
  """Connects `client` (after a TLS handshake, if any) to the worker."""
  try:
    if tls is not None:
      client.settimeout(30)
      client = tls.wrap_socket(client, server_side=True)
      client.settimeout(None)
      peer = x509.load_der_x509_certificate(client.getpeercert(True))
      if not allows(peer, CLIENT_AUTH):
        print('warning: refused a client certificate without the clientAuth'
              ' extended key usage (a worker\'s certificate, or one made'
              ' before it was required)', file=sys.stderr, flush=True)
        client.close()
        return
    upstream = socket.create_connection(('127.0.0.1', INNER_PORT))
  except (OSError, ssl.SSLError):
    client.close()
    return
  for a, b in ((client, upstream), (upstream, client)):
    threading.Thread(target=_pump, args=(a, b), daemon=True).start()


def tls_context(cert: str, key: str, client_ca: str) -> ssl.SSLContext:
  """Server side of mutual TLS: a client certificate from `client_ca`, h2."""
  context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
  context.minimum_version = ssl.TLSVersion.TLSv1_2
  context.load_cert_chain(cert, key)
  context.load_verify_locations(client_ca)
  context.verify_mode = ssl.CERT_REQUIRED
  context.set_alpn_protocols(['h2'])
  return context


def main(argv) -> int:
  parser = argparse.ArgumentParser()
  front = parser.add_mutually_exclusive_group(required=True)
  front.add_argument('--socket')
  front.add_argument('--tls_port', type=int)
  parser.add_argument('--tls_host', default='0.0.0.0')
  parser.add_argument('--tls_cert')
  parser.add_argument('--tls_key')
  parser.add_argument('--tls_client_ca')
  parser.add_argument('worker', nargs=argparse.REMAINDER)
  args = parser.parse_args(argv)
  worker = [a for a in args.worker if a != '--']

  def status(line):
    # The worker service (--tls_port) reports failures to its user on
    # stderr; an owned worker's parent reads them from stdout.
    if line.startswith('ready') or not args.tls_port:
      print(line, flush=True)
    else:
      print(f'error: {line.removeprefix("error: ")}', file=sys.stderr,
            flush=True)

  try:
    listener, tls = None, None
    if args.tls_port:
      tls = tls_context(args.tls_cert, args.tls_key, args.tls_client_ca)
      # Bound before entering the namespace: it stays in the host's.
      listener = socket.create_server((args.tls_host, args.tls_port))
  except (OSError, ssl.SSLError) as e:
    status(f'error: {e}')
    return 1
  try:
    enter_private_network()
  except OSError as e:
    status(f'unavailable: {e}')
    return 3
  process = subprocess.Popen(
      worker + [f'--port={INNER_PORT}'], stdin=subprocess.DEVNULL,
      stdout=sys.stderr, stderr=subprocess.STDOUT, close_fds=True,
      preexec_fn=_die_with_parent)
  try:
    _wait_for_port(INNER_PORT, process, timeout_s=60)
    if listener is None:
      old_umask = os.umask(0o077)
      try:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(args.socket)
      finally:
        os.umask(old_umask)
      os.chmod(args.socket, 0o600)
      listener.listen()
  except (OSError, RuntimeError) as e:
    process.kill()
    status(f'error: {e}')
    return 1
  signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
  listener.settimeout(1.0)
  status('ready')
  try:
    while process.poll() is None:
      try:
        client, _ = listener.accept()
      except socket.timeout:
        continue
      client.settimeout(None)
      threading.Thread(target=_relay, args=(client, tls), daemon=True).start()
  finally:
    process.kill()
    process.wait()
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
