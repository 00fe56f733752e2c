// Command pause is the sandbox container of every pod on the test cluster: it holds the pod's
// namespaces open, doing nothing. When the pod shares one PID namespace it is PID 1 there, so it reaps
// orphaned children (a zombie stays until its parent waits for it, and PID 1 inherits every orphan).
// It exits on SIGTERM or SIGINT, as the kubelet's StopPodSandbox expects of a sandbox.
package main

import (
	"fmt"
	"os"
	"os/signal"
	"syscall"
)

func main() {
	if len(os.Args) > 1 && os.Args[1] == "-v" {
		fmt.Println("pause (ztrust test cluster)")
		return
	}
	signals := make(chan os.Signal, 8)
	signal.Notify(signals, syscall.SIGCHLD, syscall.SIGTERM, syscall.SIGINT)
	for s := range signals {
		if s != syscall.SIGCHLD {
			os.Exit(0)
		}
		// Signals coalesce: one SIGCHLD may stand for several exited children, so wait for all of
		// them without blocking.
		for {
			var status syscall.WaitStatus
			pid, err := syscall.Wait4(-1, &status, syscall.WNOHANG, nil)
			if pid <= 0 || err != nil {
				break
			}
		}
	}
}
