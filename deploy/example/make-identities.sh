#!/usr/bin/env bash
# Prints the identity Secrets the injected sidecars mount
# (remora-identity-<service account>: cert-chain.pem, key.pem, root-cert.pem),
# issued by a fresh mesh CA, as YAML for `kubectl apply -f -`.
#
#   ./make-identities.sh NAMESPACE [SERVICE_ACCOUNT...]   (default: frontend backend)
#
# Each certificate carries the workload's SPIFFE ID
# (spiffe://cluster.local/ns/NAMESPACE/sa/SERVICE_ACCOUNT) and lasts 90 days.
# With CA_DIR set, the CA is kept there (made on first use) so that several
# runs (namespaces) share one trust root, as a control plane and its proxies
# must. For production, issue them from your own CA (cert-manager, Vault,
# SPIRE) into Secrets of the same shape; remora reloads rotated files itself.
set -euo pipefail
ns="${1:?usage: $0 NAMESPACE [SERVICE_ACCOUNT...]}"
shift
accounts=("$@")
[ ${#accounts[@]} -gt 0 ] || accounts=(frontend backend)
trust_domain="${TRUST_DOMAIN:-cluster.local}"
dir="$(mktemp -d)"
trap 'rm -rf "$dir"' EXIT
ca="${CA_DIR:-$dir}"
mkdir -p "$ca"
if [ ! -s "$ca/ca.pem" ] || [ ! -s "$ca/ca.key" ]; then
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 365 \
    -subj "/O=remora mesh/CN=root" -keyout "$ca/ca.key" -out "$ca/ca.pem" 2>/dev/null
fi

b64() { base64 < "$1" | tr -d '\n'; }
for sa in "${accounts[@]}"; do
  id="spiffe://${trust_domain}/ns/${ns}/sa/${sa}"
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/O=remora mesh" \
    -keyout "$dir/$sa.key" -out "$dir/$sa.csr" 2>/dev/null
  printf 'subjectAltName=critical,URI:%s\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth,clientAuth\nbasicConstraints=critical,CA:FALSE\n' \
    "$id" > "$dir/$sa.ext"
  openssl x509 -req -in "$dir/$sa.csr" -CA "$ca/ca.pem" -CAkey "$ca/ca.key" -CAserial "$dir/ca.srl" -CAcreateserial \
    -days 90 -extfile "$dir/$sa.ext" -out "$dir/$sa.pem" 2>/dev/null
  cat <<YAML
---
apiVersion: v1
kind: Secret
metadata:
  name: remora-identity-${sa}
  namespace: ${ns}
type: Opaque
data:
  cert-chain.pem: $(b64 "$dir/$sa.pem")
  key.pem: $(b64 "$dir/$sa.key")
  root-cert.pem: $(b64 "$ca/ca.pem")
YAML
done
