// Command ztrust-k8s is one binary holding the upstream Kubernetes components that a one-node test
// cluster needs (`cargo xtask cluster up`), so that they are built from Go modules at one pinned version
// rather than downloaded. Each component still runs as its own process: the component is chosen by the
// name the binary was started as (a symlink such as kubectl → ztrust-k8s) or by the first argument
// (`ztrust-k8s kube-apiserver --flag…`).
package main

import (
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"github.com/spf13/cobra"

	"k8s.io/component-base/cli"
	"k8s.io/component-base/logs"
	_ "k8s.io/component-base/logs/json/register"          // --logging-format=json, as upstream's mains
	_ "k8s.io/component-base/metrics/prometheus/clientgo" // client-go metrics, as upstream's mains
	_ "k8s.io/component-base/metrics/prometheus/version"  // the kubernetes_build_info metric
	_ "time/tzdata"                                       // CronJob time zones without the host's zoneinfo

	_ "k8s.io/client-go/plugin/pkg/client/auth"
	kubectlcmd "k8s.io/kubectl/pkg/cmd"
	kubectlutil "k8s.io/kubectl/pkg/cmd/util"
	apiserver "k8s.io/kubernetes/cmd/kube-apiserver/app"
	controllermanager "k8s.io/kubernetes/cmd/kube-controller-manager/app"
	proxy "k8s.io/kubernetes/cmd/kube-proxy/app"
	scheduler "k8s.io/kubernetes/cmd/kube-scheduler/app"
	kubelet "k8s.io/kubernetes/cmd/kubelet/app"
)

// Each entry runs one component to completion and returns its exit code. The cobra commands are built
// only for the component that runs, as upstream's mains do: building one registers its flags and
// feature gates, and two components' sets in one process would clash.
var components = map[string]func() int{
	"kube-apiserver":          func() int { return cli.Run(apiserver.NewAPIServerCommand()) },
	"kube-controller-manager": func() int { return cli.Run(controllermanager.NewControllerManagerCommand()) },
	"kube-scheduler":          func() int { return cli.Run(scheduler.NewSchedulerCommand()) },
	"kubelet":                 func() int { return cli.Run(kubelet.NewKubeletCommand(signalContext())) },
	"kube-proxy":              func() int { return cli.Run(proxy.NewProxyCommand()) },
	"kubectl":                 runKubectl,
	"etcd":                    runEtcd,
	"coredns":                 runCoreDNS,
}

func main() {
	name := filepath.Base(os.Args[0])
	if _, ok := components[name]; !ok {
		if len(os.Args) < 2 || components[os.Args[1]] == nil {
			usage()
			os.Exit(2)
		}
		// `ztrust-k8s kubectl get pods` runs as if started as `kubectl get pods`: every component
		// parses os.Args[1:], and kubectl also reads os.Args for plugins and log verbosity.
		name = os.Args[1]
		os.Args = append([]string{name}, os.Args[2:]...)
	}
	if name != "coredns" {
		dropCoreDNSFlags()
	}
	os.Exit(components[name]())
}

func usage() {
	names := make([]string, 0, len(components))
	for n := range components {
		names = append(names, n)
	}
	sort.Strings(names)
	fmt.Fprintf(os.Stderr, "usage: ztrust-k8s COMPONENT [ARGS...], or started through a link named COMPONENT\ncomponents: %s\n",
		strings.Join(names, ", "))
}

func runKubectl() int {
	// As cmd/kubectl: klog's verbosity has to be known before the command tree is built.
	_, _ = logs.GlogSetter(kubectlcmd.GetLogVerbosity(os.Args))
	var command *cobra.Command = kubectlcmd.NewDefaultKubectlCommand()
	if err := cli.RunNoErrOutput(command); err != nil {
		kubectlutil.CheckErr(err)
	}
	return 0
}
