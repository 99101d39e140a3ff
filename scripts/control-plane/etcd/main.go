// Command etcd runs a single-member etcd server for the kubetune test control
// plane. It is a few lines over go.etcd.io/etcd/server/v3/embed, built in the
// same Go module as the Kubernetes components so that the dependencies the two
// share compile once.
//
// Flags keep the names of the real etcd's:
//
//	etcd --data-dir DIR --listen-client-urls http://127.0.0.1:PORT \
//	     --listen-peer-urls http://127.0.0.1:PORT [--unsafe-no-fsync]
//
// It stops cleanly on SIGTERM or SIGINT.
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

func mustURL(flagName, raw string) url.URL {
	u, err := url.Parse(raw)
	if err != nil || u.Scheme == "" || u.Host == "" {
		fmt.Fprintf(os.Stderr, "etcd: --%s: not a URL: %q\n", flagName, raw)
		os.Exit(2)
	}
	return *u
}

func main() {
	dataDir := flag.String("data-dir", "default.etcd", "Path to the data directory.")
	name := flag.String("name", "default", "Human-readable name for this member.")
	clientURL := flag.String("listen-client-urls", "http://127.0.0.1:2379", "URL to listen on for client traffic (also advertised).")
	peerURL := flag.String("listen-peer-urls", "http://127.0.0.1:2380", "URL to listen on for peer traffic (also advertised).")
	noFsync := flag.Bool("unsafe-no-fsync", false, "Disable fsync: faster, but data may be lost on a crash (tests only).")
	logLevel := flag.String("log-level", "info", "Log level: debug, info, warn, error, panic or fatal.")
	readyTimeout := flag.Duration("ready-timeout", 5*time.Minute, "How long to wait for the server to become ready.")
	flag.Parse()

	cfg := embed.NewConfig()
	cfg.Name = *name
	cfg.Dir = *dataDir
	cfg.ListenClientUrls = []url.URL{mustURL("listen-client-urls", *clientURL)}
	cfg.AdvertiseClientUrls = cfg.ListenClientUrls
	cfg.ListenPeerUrls = []url.URL{mustURL("listen-peer-urls", *peerURL)}
	cfg.AdvertisePeerUrls = cfg.ListenPeerUrls
	cfg.InitialCluster = cfg.InitialClusterFromName(cfg.Name)
	cfg.UnsafeNoFsync = *noFsync
	cfg.LogLevel = *logLevel

	e, err := embed.StartEtcd(cfg)
	if err != nil {
		fmt.Fprintf(os.Stderr, "etcd: start: %v\n", err)
		os.Exit(1)
	}

	signals := make(chan os.Signal, 1)
	signal.Notify(signals, syscall.SIGTERM, syscall.SIGINT)

	select {
	case <-e.Server.ReadyNotify():
		fmt.Fprintf(os.Stderr, "etcd: ready to serve clients on %s\n", *clientURL)
	case <-time.After(*readyTimeout):
		e.Server.Stop()
		fmt.Fprintf(os.Stderr, "etcd: not ready after %s\n", *readyTimeout)
		os.Exit(1)
	case sig := <-signals:
		e.Close()
		fmt.Fprintf(os.Stderr, "etcd: %s before ready, stopped\n", sig)
		os.Exit(1)
	}

	select {
	case err := <-e.Err():
		e.Close()
		fmt.Fprintf(os.Stderr, "etcd: %v\n", err)
		os.Exit(1)
	case sig := <-signals:
		fmt.Fprintf(os.Stderr, "etcd: %s, stopping\n", sig)
		e.Close()
	}
}
