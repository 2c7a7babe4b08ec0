#!/usr/bin/env bash
# The ci-gateway action's step on Linux and macOS runners: find or fetch the
# ci-gateway executable, start sshd if asked, then run
# `ci-gateway runner $CI_GATEWAY_COMMAND`. Every option reaches the agent as
# a CI_GATEWAY_* environment variable (the token never on a command line).
set -euo pipefail

say() { echo "ci-gateway action: $*" >&2; }

command="${CI_GATEWAY_COMMAND:-}"
case "$command" in
  register | wait | deregister) ;;
  *) say "input 'command' must be register, wait or deregister (got '$command')"; exit 2 ;;
esac

# Inputs left empty mean "the agent's default", not "empty".
for name in $(compgen -e | grep '^CI_GATEWAY_' || true); do
  if [ -z "${!name}" ]; then unset "$name"; fi
done

bin_dir="${RUNNER_TEMP:-${TMPDIR:-/tmp}}/ci-gateway/bin"
exe="$bin_dir/ci-gateway"

install_agent() {
  mkdir -p "$bin_dir"
  if [ -n "${CI_GATEWAY_BINARY:-}" ]; then
    [ -x "$CI_GATEWAY_BINARY" ] || { say "input 'binary': $CI_GATEWAY_BINARY is not an executable file"; exit 1; }
    cp "$CI_GATEWAY_BINARY" "$exe.tmp" && chmod 0755 "$exe.tmp" && mv "$exe.tmp" "$exe"
    return
  fi
  if [ -x "$exe" ]; then return; fi # an earlier step of this job fetched it
  if [ -z "${CI_GATEWAY_DOWNLOAD_URL:-}" ]; then
    say "no ci-gateway executable: set the 'binary' input (a path on the runner) or 'download-url'"
    exit 1
  fi
  case "$(uname -s)-$(uname -m)" in
    Linux-x86_64) target=x86_64-unknown-linux-musl ;;
    Linux-aarch64 | Linux-arm64) target=aarch64-unknown-linux-musl ;;
    Darwin-arm64) target=aarch64-apple-darwin ;;
    Darwin-x86_64) target=x86_64-apple-darwin ;;
    *) say "no ci-gateway build for $(uname -s) $(uname -m)"; exit 1 ;;
  esac
  url="${CI_GATEWAY_DOWNLOAD_URL//\{target\}/$target}"
  say "downloading $url"
  curl --fail --silent --show-error --location --retry 3 --max-time 120 -o "$exe.tmp" "$url"
  chmod 0755 "$exe.tmp" && mv "$exe.tmp" "$exe"
}

start_sshd() {
  [ "${CI_GATEWAY_START_SSHD:-true}" = "true" ] || return 0
  local port="${CI_GATEWAY_PORT:-22}"
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then return 0; fi
  say "no sshd on port $port; starting the OpenSSH server"
  local sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo -n"
  if [ "$(uname -s)" = Darwin ]; then
    $sudo systemsetup -setremotelogin on || true
  else
    $sudo systemctl start ssh 2>/dev/null || $sudo systemctl start sshd 2>/dev/null ||
      $sudo service ssh start 2>/dev/null || say "could not start sshd; is openssh-server installed?"
  fi
}

install_agent
if [ "$command" = register ]; then start_sshd; fi
exec "$exe" runner "$command"
