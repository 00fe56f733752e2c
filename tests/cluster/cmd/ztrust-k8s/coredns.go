package main

import (
	"flag"

	"github.com/coredns/coredns/coremain"

	// The plugins a cluster DNS Corefile uses (kubeadm's default Corefile, less forwarding: the test
	// node has no upstream resolver to forward to). Importing a plugin registers it; CoreDNS's own main
	// imports all of them through core/plugin.
	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/forward"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/hosts"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/loadbalance"
	_ "github.com/coredns/coredns/plugin/log"
	_ "github.com/coredns/coredns/plugin/loop"
	_ "github.com/coredns/coredns/plugin/metrics"
	_ "github.com/coredns/coredns/plugin/ready"
	_ "github.com/coredns/coredns/plugin/reload"
	_ "github.com/coredns/coredns/plugin/rewrite"
	_ "github.com/coredns/coredns/plugin/template"
	_ "github.com/coredns/coredns/plugin/whoami"
)

// CoreDNS registers its flags on the standard library's global flag set when its package loads.
// kube-proxy copies that whole set into its own flags (for --boot-id-file), so the other components
// get a global set without CoreDNS's flags.
var corednsFlags = map[string]bool{"conf": true, "plugins": true, "pidfile": true, "version": true, "quiet": true, "dns.port": true, "p": true}

func dropCoreDNSFlags() {
	kept := flag.NewFlagSet(flag.CommandLine.Name(), flag.ExitOnError)
	flag.CommandLine.VisitAll(func(f *flag.Flag) {
		if !corednsFlags[f.Name] {
			kept.Var(f.Value, f.Name, f.Usage)
		}
	})
	flag.CommandLine = kept
}

func runCoreDNS() int {
	coremain.Run()
	return 0
}
