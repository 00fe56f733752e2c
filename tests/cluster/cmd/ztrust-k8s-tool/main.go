// Command ztrust-k8s-tool does the test cluster's set-up work that needs no Kubernetes code, kept out of
// the large ztrust-k8s binary so that it builds in seconds:
//
//	ztrust-k8s-tool pki   --dir DIR --node-name NAME --node-ip IP --server URL [--san IP|NAME ...]
//	ztrust-k8s-tool image --name REF --out FILE.tar [--file SRC=DST ...] [--symlink LINK=TARGET ...] ...
package main

import (
	"fmt"
	"os"
	"strings"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: ztrust-k8s-tool pki|image [flags]")
		os.Exit(2)
	}
	var err error
	switch os.Args[1] {
	case "pki":
		err = runPKI(os.Args[2:])
	case "image":
		err = runImage(os.Args[2:])
	default:
		err = fmt.Errorf("unknown command %q", os.Args[1])
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "ztrust-k8s-tool %s: %v\n", os.Args[1], err)
		os.Exit(1)
	}
}

// multiFlag is a repeatable string flag.
type multiFlag []string

func (m *multiFlag) String() string     { return strings.Join(*m, ",") }
func (m *multiFlag) Set(v string) error { *m = append(*m, v); return nil }
