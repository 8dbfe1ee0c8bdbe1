#!/usr/bin/env bash
# tools/device_debs.sh: Debian packages the GPU machine's image lacks (cpp-httplib for `lmforge serve`, PCRE2 and
# utf8proc for the BPE tokenizer,
# and the headers its pkg-config file requires), carried in the ignored folder .debs/.
#
#   tools/device_debs.sh fetch    # here (apt reachable): download the .deb files into .debs/
#   source <(tools/device_debs.sh env)   # there: unpack into /tmp/debroot and export the paths
# tools/gpu_check.sh does the second step itself when .debs/ is present; carry ".debs" in the run.
set -euo pipefail
cd "$(dirname "$0")/.."
pkgs=(libcpp-httplib0.11 libcpp-httplib-dev libbrotli1 libbrotli-dev libssl-dev zlib1g-dev
      libpcre2-8-0 libpcre2-dev libutf8proc2 libutf8proc-dev)
case "${1:-}" in
  fetch)
    grep -qx '/.debs/' .git/info/exclude 2>/dev/null || echo '/.debs/' >>.git/info/exclude
    mkdir -p .debs && (cd .debs && apt-get download "${pkgs[@]}" 2>/dev/null)
    ls .debs ;;
  env)
    root=/tmp/debroot
    mkdir -p "$root"
    for f in .debs/*.deb; do dpkg -x "$f" "$root"; done
    pc="$root/usr/lib/x86_64-linux-gnu/pkgconfig"
    [ -d "$root/usr/share/pkgconfig" ] && cp -n "$root"/usr/share/pkgconfig/*.pc "$pc"/ 2>/dev/null || true
    sed -i "s|^prefix=/usr\$|prefix=$root/usr|; s|^libdir=/usr/|libdir=$root/usr/|; s|^includedir=/usr/|includedir=$root/usr/|" "$pc"/*.pc
    echo "export PKG_CONFIG_PATH=$pc\${PKG_CONFIG_PATH:+:\$PKG_CONFIG_PATH}"
    echo "export LD_LIBRARY_PATH=$root/usr/lib/x86_64-linux-gnu\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
    echo "export LIBRARY_PATH=$root/usr/lib/x86_64-linux-gnu\${LIBRARY_PATH:+:\$LIBRARY_PATH}" ;;
  *) echo "usage: tools/device_debs.sh fetch|env" >&2; exit 2 ;;
esac
