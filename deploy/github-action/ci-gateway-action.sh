#!/usr/bin/env bash
# The ci-gateway action's step on Linux and macOS runners: find or fetch the
# ci-gateway executable, start sshd if asked, then run
# `ci-gateway runner $CI_GATEWAY_COMMAND`. Every option reaches the agent as
# a CI_GATEWAY_* environment variable (the token never on a command line).
set -euo pipefail

say() { echo "ci-gateway action: $*" >&2; }

command="${CI_GATEWAY_COMMAND:-}"
case "$command" in
  register | wait | breakpoint | deregister) ;;
  *) say "input 'command' must be register, wait, breakpoint or deregister (got '$command')"; exit 2 ;;
esac

# Inputs left empty mean "the agent's default", not "empty".
for name in $(compgen -e | grep '^CI_GATEWAY_' || true); do
  if [ -z "${!name}" ]; then unset "$name"; fi
done

bin_dir="${RUNNER_TEMP:-${TMPDIR:-/tmp}}/ci-gateway/bin"
exe="$bin_dir/ci-gateway"

sha256_of() {
  if command -v sha256sum >/dev/null 2>&1; then sha256sum "$1" | cut -d' ' -f1; else shasum -a 256 "$1" | cut -d' ' -f1; fi
}

install_agent() {
  mkdir -p "$bin_dir"
  if [ -n "${CI_GATEWAY_BINARY:-}" ]; then
    [ -x "$CI_GATEWAY_BINARY" ] || { say "input 'binary': $CI_GATEWAY_BINARY is not an executable file"; exit 1; }
    cp "$CI_GATEWAY_BINARY" "$exe.tmp" && chmod 0755 "$exe.tmp" && mv "$exe.tmp" "$exe"
    return
  fi
  if [ -x "$exe" ]; then return; fi # an earlier step of this job fetched it
  local platform target
  case "$(uname -s)-$(uname -m)" in
    Linux-x86_64) platform=linux-x86_64 target=x86_64-unknown-linux-musl ;;
    Linux-aarch64 | Linux-arm64) platform=linux-aarch64 target=aarch64-unknown-linux-musl ;;
    Darwin-arm64) platform=macos-aarch64 target=aarch64-apple-darwin ;;
    Darwin-x86_64) platform=macos-x86_64 target=x86_64-apple-darwin ;;
    *) say "no ci-gateway build for $(uname -s) $(uname -m)"; exit 1 ;;
  esac
  local curl_opts=(--fail --silent --show-error --location --retry 3 --max-time 300)
  if [ -n "${CI_GATEWAY_CA_CERT:-}" ]; then curl_opts+=(--cacert "$CI_GATEWAY_CA_CERT"); fi
  if [ -n "${CI_GATEWAY_DOWNLOAD_URL:-}" ]; then
    local url="${CI_GATEWAY_DOWNLOAD_URL//\{target\}/$target}"
    say "downloading $url"
    curl "${curl_opts[@]}" -o "$exe.tmp" "$url"
    chmod 0755 "$exe.tmp" && mv "$exe.tmp" "$exe"
    return
  fi
  # From the gateway this job registers with, so agent and gateway match;
  # checked against the gateway's SHA-256 and kept in the tool cache by it.
  local base="${CI_GATEWAY_URL%/}/v1/agent/$platform"
  local sum
  sum="$(curl "${curl_opts[@]}" "$base.sha256" | cut -d' ' -f1)" ||
    { say "cannot get the agent's checksum from $base.sha256"; exit 1; }
  if ! [[ "$sum" =~ ^[0-9a-f]{64}$ ]]; then
    say "$base.sha256 is not a SHA-256 checksum line"
    exit 1
  fi
  local cache="${RUNNER_TOOL_CACHE:-$bin_dir/cache}/ci-gateway/$sum"
  if [ -x "$cache/ci-gateway" ] && [ "$(sha256_of "$cache/ci-gateway")" = "$sum" ]; then
    say "using the agent from the tool cache ($cache)"
    cp "$cache/ci-gateway" "$exe.tmp" && chmod 0755 "$exe.tmp" && mv "$exe.tmp" "$exe"
    return
  fi
  say "downloading the agent from $base"
  curl "${curl_opts[@]}" -o "$exe.tmp" "$base"
  local got
  got="$(sha256_of "$exe.tmp")"
  if [ "$got" != "$sum" ]; then
    rm -f "$exe.tmp"
    say "the agent from $base has SHA-256 $got, not the $sum the gateway published; refusing to run it"
    exit 1
  fi
  chmod 0755 "$exe.tmp"
  mkdir -p "$cache" && cp "$exe.tmp" "$cache/ci-gateway.tmp" && mv "$cache/ci-gateway.tmp" "$cache/ci-gateway" ||
    say "could not keep the agent in the tool cache ($cache); going on"
  mv "$exe.tmp" "$exe"
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
