package main

import (
	"context"
	"os/signal"
	"syscall"
)

// signalContext is cancelled on SIGTERM or SIGINT. The kubelet takes a context for its lifetime;
// upstream's main passes context.Background() and lets its own signal handler end the process, which
// this keeps (cancelling only adds an orderly path).
func signalContext() context.Context {
	ctx, _ := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	return ctx
}
