// proxytap proxy auto-config (PAC) file: browsers and operating systems that are
// given its URL send every web request through proxytap (docs/user-guide.md, "PAC").
// Replace proxy.example.internal with the proxy's name or address, and the
// internal names and networks below with yours. Serve it as
// application/x-ns-proxy-autoconfig, e.g. http://proxy.example.internal/proxy.pac.
//
// Check it before handing it out (pacparser, from PyPI):
//   python3 -c "import pacparser; print(pacparser.just_find_proxy('deploy/proxytap.pac', 'https://example.org/'))"

function FindProxyForURL(url, host) {
  // Names without a dot (intranet shortcuts) and the proxy itself: direct.
  if (isPlainHostName(host) || dnsDomainIs(host, ".example.internal") ||
      host == "localhost") {
    return "DIRECT";
  }
  // Literal addresses in loopback and private networks: direct (proxytap refuses
  // them anyway unless access.allow_dest opens them). Only literals are compared,
  // so that no name is resolved here (a lookup per request slows every page).
  if (/^\d+\.\d+\.\d+\.\d+$/.test(host) &&
      (isInNet(host, "127.0.0.0", "255.0.0.0") ||
       isInNet(host, "10.0.0.0", "255.0.0.0") ||
       isInNet(host, "172.16.0.0", "255.240.0.0") ||
       isInNet(host, "192.168.0.0", "255.255.0.0"))) {
    return "DIRECT";
  }
  // Everything else through proxytap: HTTP proxy first (CONNECT for https:, plain
  // HTTP forwarding for http:), its SOCKS listener as a second choice. No DIRECT
  // fallback: with the proxy down, traffic stops rather than leaving unobserved.
  return "PROXY proxy.example.internal:8080; SOCKS5 proxy.example.internal:1080";
}
