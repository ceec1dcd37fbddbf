#!/usr/bin/env bash
# Coq 8.16 and mathcomp 1.15 (sources, .vo and .glob) from Debian's packages, for the
# formal pipeline (docs/formal.md) and its tests. ~35 s and ~1.1 GB the first time;
# nothing to do when they are already there.
#
#   scripts/install_coq.sh
#
# Exit 0: coqc, coqidetop.opt and the mathcomp sources are present. Exit 3: they are
# missing and cannot be installed here (not root, or no apt-get): install the packages
# named below by other means.
set -euo pipefail
MATHCOMP=/usr/lib/ocaml/coq/user-contrib/mathcomp
PACKAGES=(coq libcoq-mathcomp-ssreflect libcoq-mathcomp-algebra)
say() { echo "install_coq: $*" >&2; }

present() {
    command -v coqc > /dev/null && command -v coqidetop.opt > /dev/null \
        && [ -f "$MATHCOMP/ssreflect/ssrnat.v" ] && [ -f "$MATHCOMP/algebra/ssralg.v" ]
}

present && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get > /dev/null; then
    say "Coq and mathcomp are missing; install the Debian packages ${PACKAGES[*]} (needs root and apt-get)"
    exit 3
fi
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -q "${PACKAGES[@]}" > /dev/null 2>&1 || {
    apt-get update -q > /dev/null && apt-get install -y -q "${PACKAGES[@]}" > /dev/null
} || { say "apt-get install ${PACKAGES[*]} failed"; exit 3; }
present || { say "installed, but coqc/coqidetop.opt or the mathcomp sources are still missing"; exit 3; }
say "$(coqc --version | head -1)"
