#!/usr/bin/env bash
# Install everything dotmesh and its tests need on a fresh Debian machine (idempotent).
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need_apt+=(postgresql postgresql-contrib)
command -v runuser >/dev/null 2>&1 || need_apt+=(util-linux)
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server redis-tools)
command -v restic >/dev/null 2>&1 || need_apt+=(restic)        # benchmark peers
command -v borg >/dev/null 2>&1 || need_apt+=(borgbackup)
command -v mkfs.btrfs >/dev/null 2>&1 || need_apt+=(btrfs-progs)  # the btrfs backend, dm pool
command -v mkfs.xfs >/dev/null 2>&1 || need_apt+=(xfsprogs)        # reflink filesystems in tests
command -v rsync >/dev/null 2>&1 || need_apt+=(rsync)         # the transfer bench's peer
command -v dockerd >/dev/null 2>&1 || need_apt+=(docker.io)     # the volume driver's tests
[ -x /usr/bin/docker-compose ] || need_apt+=(docker-compose)
dpkg -s busybox-static >/dev/null 2>&1 || need_apt+=(busybox-static)  # test images, no registry
command -v gcc >/dev/null 2>&1 || need_apt+=(gcc libc6-dev)     # dm's compiled folder listing
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)      # the web UI's browser tests
command -v chromedriver >/dev/null 2>&1 || need_apt+=(chromium-driver)
command -v fusermount3 >/dev/null 2>&1 || need_apt+=(fuse3)       # dm mount
dpkg -s libfuse3-dev >/dev/null 2>&1 || need_apt+=(libfuse3-dev pkg-config)  # builds pyfuse3
/usr/bin/python3 -c "import pyfuse3" 2>/dev/null || need_apt+=(python3-pyfuse3)  # borg mount: a peer
python3 -c 'import os, sysconfig; os.stat(sysconfig.get_paths()["include"] + "/Python.h")' \
  2>/dev/null || need_apt+=(python3-dev)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
# Compiled once here: with PYTHONDONTWRITEBYTECODE set (as on CI), every dm command would
# otherwise compile the package again, about 40% of its start-up time.
.venv/bin/python -m compileall -q src >/dev/null
# Man pages made from the commands' help (dm help --man). man finds them by itself when
# .venv/bin is on PATH; otherwise: MANPATH="$PWD/.venv/share/man:" man dm-commit
rm -rf .venv/share/man/man1/dm.1 .venv/share/man/man1/dm-*.1
DM_DAEMON=off .venv/bin/dm help --man .venv/share/man/man1 >/dev/null
