#!/usr/bin/env bash
# System packages the tests and the benchmark need: Python gRPC (the cross-language client test),
# NumPy (dumps written by NumPy), redis-server (the benchmark's peer), openssl (the TLS tests make
# their certificates with it), kcat (its mock Kafka cluster), etcd-server and prometheus. Idempotent.
set -euo pipefail
need=()
/usr/bin/python3 -c 'import grpc, grpc_tools' 2>/dev/null || need+=(python3-grpcio python3-grpc-tools)
/usr/bin/python3 -c 'import numpy' 2>/dev/null || need+=(python3-numpy)
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
command -v kcat >/dev/null 2>&1 || need+=(kcat)
command -v etcd >/dev/null 2>&1 || need+=(etcd-server)
command -v prometheus >/dev/null 2>&1 || need+=(prometheus)
if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install-deps: please install ${need[*]} (Debian package names) with your package manager" >&2
  exit 1
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
echo "install-deps: installing ${need[*]}" >&2
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
