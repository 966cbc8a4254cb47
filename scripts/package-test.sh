#!/usr/bin/env bash
# The Debian package, tested on this machine as root: builds it (cargo-deb, from the release
# build), installs it with dpkg, checks its files, user, state directory and unit, runs the
# service as its unit says (systemd where it is PID 1; else the unit's ExecStart as the unit's
# User=, with its Environment= and WorkingDirectory=), sends a POST with an Idempotency-Key
# twice to a small upstream of its own and checks the second is a replay and the upstream ran
# once, stops it with SIGTERM, checks the SQLite file in /var/lib/idem is idem's, and purges
# the package (also on failure), leaving the machine as it found it.
#
# Ports (loopback): 18480 client traffic, 19480 admin, 18481 the upstream;
# override with PACKAGE_TEST_PORT, PACKAGE_TEST_ADMIN_PORT, PACKAGE_TEST_UPSTREAM_PORT.
set -euo pipefail
cd "$(dirname "$0")/.."

port=${PACKAGE_TEST_PORT:-18480}
admin_port=${PACKAGE_TEST_ADMIN_PORT:-19480}
upstream_port=${PACKAGE_TEST_UPSTREAM_PORT:-18481}

fail() { echo "package-test: FAILED: $*" >&2; exit 1; }
say() { echo "package-test: $*"; }

[ "$(id -u)" = 0 ] || fail "run as root (it installs and purges a package)"
command -v cargo-deb >/dev/null || fail "cargo-deb is needed: cargo install cargo-deb --locked"
# The package's state for dpkg: empty or not-installed when absent (or purged).
package_state() { dpkg-query -W -f='${db:Status-Status}' idem 2>/dev/null || true; }
case "$(package_state)" in
  '' | not-installed) ;;
  *) fail "an idem package is on this machine ($(package_state)); not touching it" ;;
esac
# Purging deletes /etc/idem and /var/lib/idem: never run where they hold something already.
for dir in /etc/idem /var/lib/idem; do
  [ -e "$dir" ] && fail "$dir exists without the package (a manual install?); not touching it"
done
user_existed=no
getent passwd idem >/dev/null && user_existed=yes

work=$(mktemp -d)
idem_pid=
upstream_pid=
cleanup() {
  rc=$?
  [ -n "$idem_pid" ] && kill -KILL "$idem_pid" 2>/dev/null || true
  [ -n "$upstream_pid" ] && kill "$upstream_pid" 2>/dev/null || true
  state=$(package_state)
  if [ -n "$state" ] && [ "$state" != not-installed ]; then
    if [ "$booted" = yes ]; then systemctl stop idem 2>/dev/null || true; fi
    dpkg --purge idem >/dev/null || echo "package-test: dpkg --purge idem failed" >&2
  fi
  # The package leaves its system user behind on purge, as Debian does; this test made it.
  if [ "$user_existed" = no ] && getent passwd idem >/dev/null; then
    deluser --system --quiet idem >/dev/null 2>&1 || userdel idem || true
    getent group idem >/dev/null && groupdel idem 2>/dev/null || true
  fi
  if [ "$rc" -ne 0 ] && [ -s "$work/idem.log" ]; then
    echo "package-test: the service's log:" >&2
    sed 's/^/    /' "$work/idem.log" >&2
  fi
  rm -rf "$work"
  exit "$rc"
}
booted=no
[ "$(ps -p 1 -o comm= | tr -d ' ')" = systemd ] && booted=yes
trap cleanup EXIT

say "building the package (cargo build --release -p idem, then cargo deb --no-build --dbgsym)"
cargo build --release --locked --quiet -p idem
cargo deb -p idem --no-build --dbgsym --output "$work/" >"$work/cargo-deb.log" 2>&1 \
  || { cat "$work/cargo-deb.log" >&2; fail "cargo deb"; }
deb=$(ls "$work"/*.deb)
say "built $(basename "$deb") ($(du -k "$deb" | cut -f1) KiB)"

say "checking its contents and control data"
contents=$(dpkg-deb -c "$deb")
for path in ./usr/bin/idem ./etc/idem/idem.toml ./usr/share/doc/idem/deploying.md; do
  grep -q " $path\$" <<<"$contents" || fail "$path is not in the package"
done
grep -Eq ' \./(usr/)?lib/systemd/system/idem\.service$' <<<"$contents" || fail "idem.service is not in the package"
dpkg-deb -f "$deb" Depends | grep -q adduser || fail "Depends lacks adduser"
dpkg-deb --ctrl-tarfile "$deb" | tar -xO ./conffiles | grep -qx /etc/idem/idem.toml \
  || fail "/etc/idem/idem.toml is not a conffile"

say "installing it (dpkg -i)"
dpkg -i "$deb" >"$work/dpkg.log" 2>&1 || { cat "$work/dpkg.log" >&2; fail "dpkg -i"; }
unit=$(ls /lib/systemd/system/idem.service /usr/lib/systemd/system/idem.service 2>/dev/null | head -n 1)
[ -n "$unit" ] || fail "the unit is not installed"
[ -x /usr/bin/idem ] || fail "/usr/bin/idem is not installed"
/usr/bin/idem serve --help >/dev/null || fail "the installed binary does not run"

passwd_line=$(getent passwd idem) || fail "no system user idem"
uid=$(cut -d: -f3 <<<"$passwd_line")
[ "$uid" -lt 1000 ] || fail "idem is not a system user (uid $uid)"
case "$(cut -d: -f7 <<<"$passwd_line")" in */nologin|*/false) ;; *) fail "idem has a login shell" ;; esac
[ "$(stat -c '%U:%G %a' /var/lib/idem)" = "idem:idem 750" ] || fail "/var/lib/idem is $(stat -c '%U:%G %a' /var/lib/idem)"
[ "$(stat -c '%U:%G %a' /etc/idem/idem.toml)" = "root:idem 640" ] || fail "/etc/idem/idem.toml is $(stat -c '%U:%G %a' /etc/idem/idem.toml)"
say "user idem (uid $uid), /var/lib/idem idem:idem 750, /etc/idem/idem.toml root:idem 640"

for directive in 'User=idem' 'StateDirectory=idem' 'ConfigurationDirectory=idem' 'NoNewPrivileges=yes' \
  'ProtectSystem=strict' 'ProtectHome=yes' 'PrivateTmp=yes' 'PrivateDevices=yes' \
  'RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX' 'SystemCallFilter=@system-service' \
  'CapabilityBoundingSet=' 'MemoryDenyWriteExecute=yes' 'Restart=on-failure' 'KillSignal=SIGTERM'; do
  grep -qx "$directive" "$unit" || fail "the unit lacks $directive"
done
stop_secs=$(sed -n 's/^TimeoutStopSec=\([0-9]*\)s$/\1/p' "$unit")
[ "${stop_secs:-0}" -gt 30 ] || fail "TimeoutStopSec must be above the gateway's 30s --shutdown-timeout"
if command -v systemd-analyze >/dev/null; then
  # Offline checks of the unit's syntax and directives (needs no running systemd).
  systemd-analyze verify "$unit" >"$work/verify.log" 2>&1 || { cat "$work/verify.log" >&2; fail "systemd-analyze verify"; }
  if grep -v 'network-online.target' "$work/verify.log" | grep -q .; then
    cat "$work/verify.log" >&2; fail "systemd-analyze verify complained"
  fi
  say "systemd-analyze verify: clean"
fi

say "a counting upstream on 127.0.0.1:$upstream_port"
# Answers every POST with 201 and how many POSTs it has seen; the count is also in a file.
python3 - "$upstream_port" "$work/upstream-count" >"$work/upstream.log" 2>&1 <<'PY' &
import http.server, sys
port, count_file = int(sys.argv[1]), sys.argv[2]
count = 0
class Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        global count
        self.rfile.read(int(self.headers.get("content-length") or 0))
        count += 1
        open(count_file, "w").write(str(count))
        body = ('{"order": %d}' % count).encode()
        self.send_response(201)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", port), Handler).serve_forever()
PY
upstream_pid=$!
for _ in $(seq 1 100); do
  curl -s -o /dev/null "http://127.0.0.1:$upstream_port/" && break
  sleep 0.1
done
curl -s -o /dev/null "http://127.0.0.1:$upstream_port/" || fail "the upstream did not listen: $(cat "$work/upstream.log")"

# The test's own settings in the package's config file (purged with it).
cat >/etc/idem/idem.toml <<EOF
upstream = "http://127.0.0.1:$upstream_port"
listen = "127.0.0.1:$port"
admin-listen = "127.0.0.1:$admin_port"
store = "sqlite:///var/lib/idem/idem.db"
shutdown-timeout = "30s"
EOF

if [ "$booted" = yes ]; then
  say "systemd is PID 1: starting the unit"
  systemctl daemon-reload
  systemctl restart idem
else
  # No systemd here: run the unit's own command line, as its User=, with its Environment= and
  # WorkingDirectory=. Its sandboxing directives are not enforced this way (only checked by
  # systemd-analyze verify above).
  exec_start=$(sed -n 's/^ExecStart=//p' "$unit")
  run_as=$(sed -n 's/^User=//p' "$unit")
  working_dir=$(sed -n 's/^WorkingDirectory=//p' "$unit")
  mapfile -t unit_env < <(sed -n 's/^Environment=//p' "$unit")
  say "systemd is not PID 1 ($(ps -p 1 -o comm=)): running '$exec_start' as $run_as in $working_dir"
  # setpriv execs (runuser would stay as a parent), so $! is the gateway itself.
  # shellcheck disable=SC2086 # ExecStart is split on spaces, as systemd splits it.
  (cd "$working_dir" && exec setpriv --reuid="$run_as" --regid="$run_as" --init-groups -- \
    env "${unit_env[@]}" $exec_start) >"$work/idem.log" 2>&1 &
  idem_pid=$!
fi

healthy=no
for _ in $(seq 1 100); do
  if curl -fsS "http://127.0.0.1:$admin_port/healthz" >/dev/null 2>&1; then healthy=yes; break; fi
  sleep 0.1
done
[ "$healthy" = yes ] || fail "the service did not answer /healthz on 127.0.0.1:$admin_port"
if [ "$booted" = no ]; then
  # The gateway runs as idem (setpriv execs env, which execs idem: the same process).
  service_uid=$(awk '/^Uid:/ {print $2}' "/proc/$idem_pid/status")
  [ "$service_uid" = "$uid" ] || fail "the service runs as uid $service_uid, not idem's $uid"
fi

key="package-test-$$-$(date +%s)"
post() {
  curl -sS -D "$work/headers-$1" -o "$work/body-$1" -w '%{http_code}' \
    -X POST -H "Idempotency-Key: $key" -H 'content-type: application/json' \
    --data '{"item": "book"}' "http://127.0.0.1:$port/orders"
}
first=$(post 1)
second=$(post 2)
[ "$first" = 201 ] || fail "the first POST got $first: $(cat "$work/body-1")"
[ "$second" = 201 ] || fail "the retry got $second: $(cat "$work/body-2")"
grep -qi '^idempotent-replayed: true' "$work/headers-1" && fail "the first POST was a replay"
grep -qi '^idempotent-replayed: true' "$work/headers-2" || fail "the retry was not a replay"
cmp -s "$work/body-1" "$work/body-2" || fail "the replay's body differs"
[ "$(cat "$work/upstream-count")" = 1 ] || fail "the upstream ran $(cat "$work/upstream-count") times"
say "POST twice with one key: 201, then 201 with Idempotent-Replayed: true, the same body; upstream ran once"

say "SIGTERM"
if [ "$booted" = yes ]; then
  systemctl stop idem
else
  kill -TERM "$idem_pid"
  exit_status=0
  wait "$idem_pid" || exit_status=$?
  idem_pid=
  [ "$exit_status" = 0 ] || fail "the service exited $exit_status on SIGTERM"
fi
[ -f /var/lib/idem/idem.db ] || fail "no SQLite file in /var/lib/idem: $(ls -la /var/lib/idem)"
[ "$(stat -c %U /var/lib/idem/idem.db)" = idem ] || fail "/var/lib/idem/idem.db is owned by $(stat -c %U /var/lib/idem/idem.db)"
say "stopped cleanly; /var/lib/idem/idem.db is idem's"

say "purging (dpkg --purge idem)"
dpkg --purge idem >"$work/purge.log" 2>&1 || { cat "$work/purge.log" >&2; fail "dpkg --purge"; }
for path in /usr/bin/idem /etc/idem /var/lib/idem "$unit"; do
  [ ! -e "$path" ] || fail "$path is left after purge"
done
say "PASSED"
