#!/usr/bin/env bash
# Installs the real external tools the test suite drives (curl, htpasswd, promtool, tshark: the JA3 oracle and the PCAP reader; mergecap comes with it; haproxy: the load balancer in front of two proxytap instances, run by the test itself, never as a service; chromium, headless, and certutil for its NSS trust store: the browser of the interception acceptance test, whose HTTP/2 origin is nginx, also run by the test itself). Debian packages only; a no-op when they are present.
set -euo pipefail
need=()
command -v curl >/dev/null 2>&1 || need+=(curl)
command -v htpasswd >/dev/null 2>&1 || need+=(apache2-utils)
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
command -v tshark >/dev/null 2>&1 || need+=(tshark)
command -v haproxy >/dev/null 2>&1 || need+=(haproxy)
# systemd-analyze, systemd-sysusers, systemd-tmpfiles: checks of deploy/systemd (no running systemd needed)
command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
[ -x /usr/lib/chromium/chromium ] || need+=(chromium)
command -v certutil >/dev/null 2>&1 || need+=(libnss3-tools)
[ -x /usr/sbin/nginx ] || need+=(nginx)
# upstream proxies of the chaining tests (run by the tests on loopback ports, never as services)
command -v microsocks >/dev/null 2>&1 || need+=(microsocks)
command -v squid >/dev/null 2>&1 || need+=(squid)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "tests need: ${need[*]} (install them with apt-get, or run as root)" >&2
    exit 1
  fi
  echo "installing test tools: ${need[*]}"
  apt-get update -qq
  # tshark's package asks whether non-root users may capture: answer no, without a prompt
  echo "wireshark-common wireshark-common/install-setuid boolean false" | debconf-set-selections
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}"
  # the tests run their own haproxy on loopback ports; the packaged service stays off
  if [[ " ${need[*]} " == *" haproxy "* ]] && [ -d /run/systemd/system ]; then
    systemctl disable --now haproxy >/dev/null 2>&1 || true
  fi
  if [[ " ${need[*]} " == *" nginx "* ]] && [ -d /run/systemd/system ]; then
    systemctl disable --now nginx >/dev/null 2>&1 || true
  fi
  if [[ " ${need[*]} " == *" squid "* ]] && [ -d /run/systemd/system ]; then
    systemctl disable --now squid >/dev/null 2>&1 || true
  fi
fi
