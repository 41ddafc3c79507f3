#!/bin/sh
# Make TLS credentials for a migration in QEMU's tls-creds-x509 layout:
#
#   tools/tls-certs.sh DIR [HOSTNAME...]
#
# DIR gets ca-cert.pem (a new CA; its key ca-key.pem stays beside it),
# server-cert.pem + server-key.pem (valid for each HOSTNAME, default
# localhost, and for 127.0.0.1 and ::1) and client-cert.pem +
# client-key.pem, all signed by that CA. Both minivmm and QEMU read DIR:
#
#   destination: -object tls-creds-x509,id=tls0,dir=DIR,endpoint=server
#   source:      -object tls-creds-x509,id=tls0,dir=DIR,endpoint=client
#   then on the source: migrate-set-parameters tls-creds=tls0
#
# For two hosts, copy DIR to both (a real deployment keeps ca-key.pem
# apart and gives each side only its own key). Needs openssl.
set -eu
[ $# -ge 1 ] || { echo "usage: $0 DIR [HOSTNAME...]" >&2; exit 2; }
dir=$1
shift
[ $# -ge 1 ] || set -- localhost
mkdir -p "$dir"
cd "$dir"
san="IP:127.0.0.1,IP:::1"
for h in "$@"; do san="DNS:$h,$san"; done
days=3650
openssl req -x509 -newkey rsa:2048 -nodes -days $days -subj "/CN=minivmm migration CA" \
    -keyout ca-key.pem -out ca-cert.pem \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
sign() { # NAME CN EXT
    openssl req -newkey rsa:2048 -nodes -subj "/CN=$2" -keyout "$1-key.pem" -out "$1.csr" 2>/dev/null
    printf '%s\n' "$3" > "$1.ext"
    openssl x509 -req -in "$1.csr" -CA ca-cert.pem -CAkey ca-key.pem -CAcreateserial \
        -days $days -out "$1-cert.pem" -extfile "$1.ext" 2>/dev/null
    rm -f "$1.csr" "$1.ext"
}
sign server "$1" "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=$san"
sign client "minivmm migration client" "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=clientAuth"
rm -f ca-cert.srl
chmod 600 ./*-key.pem
echo "TLS credentials in $dir: ca-cert.pem, server-cert.pem/-key.pem ($*), client-cert.pem/-key.pem"
