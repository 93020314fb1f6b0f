#!/usr/bin/env bash
# Make the certificates of a gateway's TLS with openssl: a private CA, a server certificate the CA
# signed, and a client certificate for mutual TLS.
#
#   bash ~/mlaserve/deploy/make-certs.sh [DIR]          # default DIR: ~/mlaserve-tls
#   MLASERVE_TLS_SANS="gw.example.com 203.0.113.7" bash ~/mlaserve/deploy/make-certs.sh
#
# Writes (keys readable by this user only):
#   DIR/ca.key, DIR/ca.crt          the CA; ca.key never needs to leave this machine
#   DIR/server.key, DIR/server.crt  the gateway's (--tls-cert/--tls-key); names in it: localhost,
#                                   127.0.0.1, ::1, mlaserve-gateway, this host's names and addresses,
#                                   and MLASERVE_TLS_SANS (names or addresses, space- or comma-separated)
#   DIR/client/ca.crt, client.crt, client.key   what a client needs (--tls-ca/--tls-cert/--tls-key):
#                                   copy this directory to the machines that call the gateway
# A client that dials an address not in the server certificate passes --tls-server-name mlaserve-gateway.
#
# Files that exist are kept, so running it again (every `ray up` does) changes nothing; delete
# server.crt to remake the server certificate with new names, or the whole DIR to start over.
# Certificates are valid MLASERVE_TLS_DAYS days (825; the CA ten times as long).
set -euo pipefail

DIR=${1:-${MLASERVE_TLS_DIR:-$HOME/mlaserve-tls}}
DIR=${DIR/#\~/$HOME}
DAYS=${MLASERVE_TLS_DAYS:-825}
command -v openssl >/dev/null || { echo "make-certs.sh: openssl is not installed" >&2; exit 1; }
umask 077
mkdir -p "$DIR/client"
cd "$DIR"

new_key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }

serial() { echo "0x$(openssl rand -hex 16)"; }

sign() {  # sign NAME's request with the CA: sign NAME SUBJECT EXTENSIONS
  local name=$1 subject=$2 ext=$3
  new_key "$name.key"
  openssl req -new -key "$name.key" -subj "$subject" -out "$name.csr"
  printf '%b' "$ext" >"$name.ext"
  openssl x509 -req -in "$name.csr" -CA ca.crt -CAkey ca.key -set_serial "$(serial)" -days "$DAYS" \
    -sha256 -extfile "$name.ext" -out "$name.crt" 2>/dev/null
  rm -f "$name.csr" "$name.ext"
}

san_entry() {  # a name or an address as a subjectAltName entry
  if [[ "$1" =~ ^[0-9.]+$ || "$1" == *:* ]]; then echo "IP:$1"; else echo "DNS:$1"; fi
}

if [[ ! -f ca.key || ! -f ca.crt ]]; then
  new_key ca.key
  printf '%b' "basicConstraints=critical,CA:TRUE,pathlen:0\nkeyUsage=critical,keyCertSign,cRLSign\nsubjectKeyIdentifier=hash\n" >ca.ext
  openssl req -new -key ca.key -subj "/CN=mlaserve gateway CA ($(hostname))" -out ca.csr
  openssl x509 -req -in ca.csr -signkey ca.key -set_serial "$(serial)" -days "$((DAYS * 10))" -sha256 \
    -extfile ca.ext -out ca.crt 2>/dev/null
  rm -f ca.csr ca.ext server.crt client.crt  # certificates of an older CA are no use
  echo "made a CA: $DIR/ca.crt"
fi

if [[ ! -f server.crt || ! -f server.key ]]; then
  extra=${MLASERVE_TLS_SANS:-}
  # shellcheck disable=SC2206
  names=(localhost 127.0.0.1 ::1 mlaserve-gateway "$(hostname 2>/dev/null || true)"
    "$(hostname -f 2>/dev/null || true)" $(hostname -I 2>/dev/null || true) ${extra//,/ })
  sans=""
  declare -A seen=()
  for n in "${names[@]}"; do
    if [[ -z "$n" || -n "${seen[$n]:-}" ]]; then continue; fi
    seen[$n]=1
    sans+="${sans:+,}$(san_entry "$n")"
  done
  sign server "/CN=mlaserve-gateway" \
    "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\nsubjectAltName=$sans\n"
  echo "made the server certificate: $DIR/server.crt ($sans)"
fi

if [[ ! -f client.crt || ! -f client.key ]]; then
  sign client "/CN=mlaserve-client" \
    "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n"
  echo "made a client certificate: $DIR/client.crt"
fi

cp ca.crt client/ca.crt
cp client.crt client/client.crt
cp client.key client/client.key
chmod 644 ca.crt server.crt client.crt client/ca.crt client/client.crt
