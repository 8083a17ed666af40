#!/usr/bin/env bash
# Build (once) and run the embedded Artemis STOMP broker in the foreground.
#   docs/peers/artemis/run.sh [PORT] [DATA_DIR] [auto|nio|asyncio]
# PORT defaults to 61617, DATA_DIR to /tmp/artemis-data, the journal type to auto
# (ASYNCIO when libaio is usable, else NIO). Prints "ARTEMIS READY PORT" on stdout when the
# acceptor listens; SIGTERM or Ctrl-C stops it. JAVA_OPTS is passed to java (e.g. -Xmx2g).
# REBUILD=1 forces a rebuild.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
jar="$here/target/artemis-stomp-peer.jar"
port="${1:-61617}"
data="${2:-/tmp/artemis-data}"
journal="${3:-auto}"

if [[ "${REBUILD:-0}" == 1 || ! -f "$jar" || -n "$(find "$here/pom.xml" "$here/src" -newer "$jar" -type f 2>/dev/null | head -1)" ]]; then
    command -v mvn >/dev/null || { echo "run.sh: mvn not found (apt-get install -y maven)" >&2; exit 2; }
    # Offline first (the local Maven repository has everything after the first build), online otherwise.
    (cd "$here" && { mvn -q -o -B -Dstyle.color=never package -DskipTests >&2 2>/dev/null || mvn -q -B -Dstyle.color=never package -DskipTests >&2; })
fi

mkdir -p "$data"
exec java ${JAVA_OPTS:-} -jar "$jar" "$port" "$data" "$journal"
