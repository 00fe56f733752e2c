package main

import (
	"flag"
	"fmt"
	"net/url"
	"os"
	"os/signal"
	"syscall"
	"time"

	"go.etcd.io/etcd/server/v3/embed"
)

// runEtcd is a one-member etcd for the test cluster, embedded rather than etcd's own main so that it is
// built from the same module graph as the apiserver. Plain HTTP on loopback: only the apiserver, in the
// same network namespace, talks to it.
func runEtcd() int {
	fs := flag.NewFlagSet("etcd", flag.ExitOnError)
	name := fs.String("name", "ztrust-node", "member name")
	dataDir := fs.String("data-dir", "/var/lib/etcd", "data directory")
	client := fs.String("listen-client-url", "http://127.0.0.1:2379", "URL to serve clients on")
	peer := fs.String("listen-peer-url", "http://127.0.0.1:2380", "URL to serve the (only) peer on")
	metrics := fs.String("listen-metrics-url", "http://127.0.0.1:2381", "URL for /metrics and /health")
	logLevel := fs.String("log-level", "warn", "debug, info, warn or error")
	_ = fs.Parse(os.Args[1:])

	parse := func(s string) []url.URL {
		u, err := url.Parse(s)
		if err != nil {
			fmt.Fprintf(os.Stderr, "etcd: bad URL %q: %v\n", s, err)
			os.Exit(2)
		}
		return []url.URL{*u}
	}
	cfg := embed.NewConfig()
	cfg.Name = *name
	cfg.Dir = *dataDir
	cfg.ListenClientUrls = parse(*client)
	cfg.AdvertiseClientUrls = parse(*client)
	cfg.ListenPeerUrls = parse(*peer)
	cfg.AdvertisePeerUrls = parse(*peer)
	cfg.ListenMetricsUrls = parse(*metrics)
	cfg.InitialCluster = cfg.InitialClusterFromName(cfg.Name)
	cfg.LogLevel = *logLevel
	// A test cluster's history is small; compacting hourly keeps the data directory from growing
	// across long runs (the apiserver compacts too, every 5 minutes by default).
	cfg.AutoCompactionMode = "periodic"
	cfg.AutoCompactionRetention = "1h"

	e, err := embed.StartEtcd(cfg)
	if err != nil {
		fmt.Fprintf(os.Stderr, "etcd: %v\n", err)
		return 1
	}
	defer e.Close()
	select {
	case <-e.Server.ReadyNotify():
		fmt.Fprintf(os.Stderr, "etcd: ready, serving clients on %s\n", *client)
	case <-time.After(60 * time.Second):
		e.Server.Stop()
		fmt.Fprintln(os.Stderr, "etcd: not ready after 60 s")
		return 1
	}
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	select {
	case err := <-e.Err():
		fmt.Fprintf(os.Stderr, "etcd: %v\n", err)
		return 1
	case s := <-sig:
		fmt.Fprintf(os.Stderr, "etcd: %v, stopping\n", s)
		return 0
	}
}
