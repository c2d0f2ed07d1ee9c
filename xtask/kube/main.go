// Command kube is a real Kubernetes control plane for Portcullis' tests:
// one binary, run under the name of the program it should be.
//
//	etcd serve --data-dir D --client-url http://127.0.0.1:P
//	etcd compact --client-url http://127.0.0.1:P
//	kube-apiserver <kube-apiserver flags>
//	kubectl <kubectl arguments>
//
// `cargo xtask kube` builds it and links the three names to it. One binary
// links once; the three share nearly all their code. The version is pinned
// in go.mod: Kubernetes 1.35, the newest that kube-rs 5 (k8s-openapi 0.29,
// feature v1_35) supports, with the etcd that release is tested with.
package main

import (
	"context"
	"flag"
	"fmt"
	"net/url"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/server/v3/embed"
	"k8s.io/component-base/cli"
	kubectl "k8s.io/kubectl/pkg/cmd"
	kubectlutil "k8s.io/kubectl/pkg/cmd/util"
	apiserver "k8s.io/kubernetes/cmd/kube-apiserver/app"
)

func main() {
	switch name := filepath.Base(os.Args[0]); name {
	case "kube-apiserver":
		os.Exit(cli.Run(apiserver.NewAPIServerCommand()))
	case "kubectl":
		if err := cli.RunNoErrOutput(kubectl.NewDefaultKubectlCommand()); err != nil {
			// Prints the error as kubectl does and exits non-zero.
			kubectlutil.CheckErr(err)
		}
	case "etcd":
		if err := etcdMain(os.Args[1:]); err != nil {
			fmt.Fprintf(os.Stderr, "etcd: %v\n", err)
			os.Exit(1)
		}
	default:
		fmt.Fprintf(os.Stderr, "run me as etcd, kube-apiserver or kubectl, not %q\n", name)
		os.Exit(2)
	}
}

func etcdMain(args []string) error {
	if len(args) == 0 {
		return fmt.Errorf("usage: etcd serve|compact [flags]")
	}
	flags := flag.NewFlagSet("etcd "+args[0], flag.ContinueOnError)
	dataDir := flags.String("data-dir", "", "where etcd keeps its data")
	clientURL := flags.String("client-url", "http://127.0.0.1:2379", "URL clients use")
	peerURL := flags.String("peer-url", "http://127.0.0.1:2380", "URL of the (single) peer")
	if err := flags.Parse(args[1:]); err != nil {
		return err
	}
	switch args[0] {
	case "serve":
		return serve(*dataDir, *clientURL, *peerURL)
	case "compact":
		return compact(*clientURL)
	default:
		return fmt.Errorf("unknown etcd command %q (serve or compact)", args[0])
	}
}

// serve runs a single-member etcd until SIGTERM or SIGINT.
func serve(dataDir, clientURL, peerURL string) error {
	if dataDir == "" {
		return fmt.Errorf("--data-dir is required")
	}
	client, err := url.Parse(clientURL)
	if err != nil {
		return fmt.Errorf("--client-url: %w", err)
	}
	peer, err := url.Parse(peerURL)
	if err != nil {
		return fmt.Errorf("--peer-url: %w", err)
	}
	cfg := embed.NewConfig()
	cfg.Name = "portcullis-test"
	cfg.Dir = dataDir
	cfg.ListenClientUrls = []url.URL{*client}
	cfg.AdvertiseClientUrls = []url.URL{*client}
	cfg.ListenPeerUrls = []url.URL{*peer}
	cfg.AdvertisePeerUrls = []url.URL{*peer}
	cfg.InitialCluster = cfg.Name + "=" + peer.String()
	cfg.LogLevel = "warn"
	// Tests want speed over durability: no fsync wait per write.
	cfg.UnsafeNoFsync = true
	e, err := embed.StartEtcd(cfg)
	if err != nil {
		return err
	}
	defer e.Close()
	select {
	case <-e.Server.ReadyNotify():
	case <-time.After(60 * time.Second):
		return fmt.Errorf("not ready after 60 s")
	}
	fmt.Fprintf(os.Stderr, "etcd: serving clients on %s\n", client)
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	select {
	case <-stop:
		return nil
	case err := <-e.Err():
		return err
	}
}

// compact drops every revision older than the current one, so a watch or
// list that names an older resourceVersion gets 410 Gone.
func compact(clientURL string) error {
	c, err := clientv3.New(clientv3.Config{Endpoints: []string{clientURL}, DialTimeout: 5 * time.Second})
	if err != nil {
		return err
	}
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	status, err := c.Status(ctx, clientURL)
	if err != nil {
		return err
	}
	rev := status.Header.Revision
	if _, err := c.Compact(ctx, rev, clientv3.WithCompactPhysical()); err != nil {
		return err
	}
	fmt.Printf("compacted to revision %d\n", rev)
	return nil
}
