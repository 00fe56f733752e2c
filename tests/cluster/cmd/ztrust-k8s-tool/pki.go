package main

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/pem"
	"errors"
	"flag"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"time"
)

// A certificate the cluster needs: who it names (CommonName is the Kubernetes user, Organization its
// groups, https://kubernetes.io/docs/reference/access-authn-authz/authentication/#x509-client-certificates)
// and what it is for.
type leaf struct {
	file     string
	cn       string
	orgs     []string
	server   bool
	client   bool
	dnsNames []string
	ips      []net.IP
}

// A kubeconfig for one component, with its client certificate embedded.
type kubeconfig struct {
	file string
	user string
	cert string
}

func runPKI(args []string) error {
	fs := flag.NewFlagSet("pki", flag.ContinueOnError)
	dir := fs.String("dir", "", "directory for keys, certificates and kubeconfigs")
	nodeName := fs.String("node-name", "", "the node's name")
	nodeIP := fs.String("node-ip", "", "the node's IP address")
	server := fs.String("server", "", "the apiserver URL written into the kubeconfigs")
	serviceIP := fs.String("service-ip", "10.96.0.1", "the kubernetes Service's cluster IP (first of the service range)")
	var sans multiFlag
	fs.Var(&sans, "san", "another name or IP address of the apiserver (repeatable)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *dir == "" || *nodeName == "" || *nodeIP == "" || *server == "" {
		return errors.New("--dir, --node-name, --node-ip and --server are required")
	}
	node := net.ParseIP(*nodeIP)
	svc := net.ParseIP(*serviceIP)
	if node == nil || svc == nil {
		return fmt.Errorf("bad IP address in --node-ip %q or --service-ip %q", *nodeIP, *serviceIP)
	}
	if err := os.MkdirAll(*dir, 0o700); err != nil {
		return err
	}

	caKey, ca, err := loadOrMakeCA(*dir, "ca", "ztrust-test-cluster-ca")
	if err != nil {
		return err
	}
	// The front proxy's own CA, as kubeadm: the apiserver trusts the X-Remote-User headers of a
	// request only when its client certificate comes from this CA (aggregated APIs; the controller-
	// manager's and scheduler's delegated authentication read it from extension-apiserver-authentication).
	frontKey, front, err := loadOrMakeCA(*dir, "front-proxy-ca", "ztrust-test-cluster-front-proxy-ca")
	if err != nil {
		return err
	}
	if err := writeLeaf(*dir, leaf{file: "front-proxy-client", cn: "front-proxy-client", client: true}, front, frontKey); err != nil {
		return fmt.Errorf("front-proxy-client: %w", err)
	}

	apiDNS := []string{"kubernetes", "kubernetes.default", "kubernetes.default.svc", "kubernetes.default.svc.cluster.local", "localhost", *nodeName}
	apiIPs := []net.IP{svc, net.IPv4(127, 0, 0, 1), node}
	for _, s := range sans {
		if ip := net.ParseIP(s); ip != nil {
			apiIPs = append(apiIPs, ip)
		} else {
			apiDNS = append(apiDNS, s)
		}
	}
	leaves := []leaf{
		{file: "apiserver", cn: "kube-apiserver", server: true, dnsNames: apiDNS, ips: apiIPs},
		// The apiserver's client certificate towards kubelets (logs, exec, port-forward).
		{file: "apiserver-kubelet-client", cn: "kube-apiserver-kubelet-client", orgs: []string{"system:masters"}, client: true},
		{file: "admin", cn: "kubernetes-admin", orgs: []string{"system:masters"}, client: true},
		// The default RBAC bindings name these users (system:kube-controller-manager, system:kube-scheduler,
		// system:node-proxier → system:kube-proxy); the Node authorizer wants system:node:<name> in
		// group system:nodes.
		{file: "controller-manager", cn: "system:kube-controller-manager", client: true},
		{file: "scheduler", cn: "system:kube-scheduler", client: true},
		{file: "kube-proxy", cn: "system:kube-proxy", client: true},
		{file: "kubelet-client", cn: "system:node:" + *nodeName, orgs: []string{"system:nodes"}, client: true},
		{file: "kubelet-serving", cn: *nodeName, server: true, dnsNames: []string{*nodeName, "localhost"}, ips: []net.IP{node, net.IPv4(127, 0, 0, 1)}},
	}
	for _, l := range leaves {
		if err := writeLeaf(*dir, l, ca, caKey); err != nil {
			return fmt.Errorf("%s: %w", l.file, err)
		}
	}

	// The ServiceAccount token signing key pair: the apiserver signs with the private key and
	// verifies with the public one; the controller-manager needs neither (tokens are TokenRequest-bound).
	if _, err := os.Stat(filepath.Join(*dir, "sa.key")); errors.Is(err, os.ErrNotExist) {
		key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			return err
		}
		if err := writeKey(filepath.Join(*dir, "sa.key"), key); err != nil {
			return err
		}
		pub, err := x509.MarshalPKIXPublicKey(&key.PublicKey)
		if err != nil {
			return err
		}
		if err := writePEM(filepath.Join(*dir, "sa.pub"), "PUBLIC KEY", pub, 0o644); err != nil {
			return err
		}
	}

	caPEM, err := os.ReadFile(filepath.Join(*dir, "ca.crt"))
	if err != nil {
		return err
	}
	for _, k := range []kubeconfig{
		{file: "admin.kubeconfig", user: "kubernetes-admin", cert: "admin"},
		{file: "controller-manager.kubeconfig", user: "system:kube-controller-manager", cert: "controller-manager"},
		{file: "scheduler.kubeconfig", user: "system:kube-scheduler", cert: "scheduler"},
		{file: "kube-proxy.kubeconfig", user: "system:kube-proxy", cert: "kube-proxy"},
		{file: "kubelet.kubeconfig", user: "system:node:" + *nodeName, cert: "kubelet-client"},
	} {
		if err := writeKubeconfig(*dir, k, *server, caPEM); err != nil {
			return fmt.Errorf("%s: %w", k.file, err)
		}
	}
	return nil
}

func loadOrMakeCA(dir, file, name string) (crypto.Signer, *x509.Certificate, error) {
	certPath, keyPath := filepath.Join(dir, file+".crt"), filepath.Join(dir, file+".key")
	if certPEM, err := os.ReadFile(certPath); err == nil {
		keyPEM, err := os.ReadFile(keyPath)
		if err != nil {
			return nil, nil, err
		}
		cb, _ := pem.Decode(certPEM)
		kb, _ := pem.Decode(keyPEM)
		if cb == nil || kb == nil {
			return nil, nil, fmt.Errorf("%s.crt or %s.key is not PEM", file, file)
		}
		cert, err := x509.ParseCertificate(cb.Bytes)
		if err != nil {
			return nil, nil, err
		}
		key, err := x509.ParseECPrivateKey(kb.Bytes)
		if err != nil {
			return nil, nil, err
		}
		return key, cert, nil
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, err
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          serial(),
		Subject:               pkix.Name{CommonName: name},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.AddDate(10, 0, 0),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, nil, err
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, nil, err
	}
	if err := writeKey(keyPath, key); err != nil {
		return nil, nil, err
	}
	return key, cert, writePEM(certPath, "CERTIFICATE", der, 0o644)
}

// writeLeaf issues a certificate unless one is there already, so that running the command again keeps
// what the running components loaded.
func writeLeaf(dir string, l leaf, ca *x509.Certificate, caKey crypto.Signer) error {
	certPath, keyPath := filepath.Join(dir, l.file+".crt"), filepath.Join(dir, l.file+".key")
	if _, err := os.Stat(certPath); err == nil {
		return nil
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	var usage []x509.ExtKeyUsage
	if l.server {
		usage = append(usage, x509.ExtKeyUsageServerAuth)
	}
	if l.client {
		usage = append(usage, x509.ExtKeyUsageClientAuth)
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber: serial(),
		Subject:      pkix.Name{CommonName: l.cn, Organization: l.orgs},
		NotBefore:    now.Add(-time.Hour),
		NotAfter:     now.AddDate(1, 0, 0),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  usage,
		DNSNames:     l.dnsNames,
		IPAddresses:  l.ips,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
	if err != nil {
		return err
	}
	if err := writeKey(keyPath, key); err != nil {
		return err
	}
	return writePEM(certPath, "CERTIFICATE", der, 0o644)
}

func writeKubeconfig(dir string, k kubeconfig, server string, caPEM []byte) error {
	cert, err := os.ReadFile(filepath.Join(dir, k.cert+".crt"))
	if err != nil {
		return err
	}
	key, err := os.ReadFile(filepath.Join(dir, k.cert+".key"))
	if err != nil {
		return err
	}
	b64 := base64.StdEncoding.EncodeToString
	text := fmt.Sprintf(`apiVersion: v1
kind: Config
clusters:
- name: ztrust
  cluster:
    server: %s
    certificate-authority-data: %s
users:
- name: %s
  user:
    client-certificate-data: %s
    client-key-data: %s
contexts:
- name: ztrust
  context:
    cluster: ztrust
    user: %s
current-context: ztrust
`, server, b64(caPEM), k.user, b64(cert), b64(key), k.user)
	return os.WriteFile(filepath.Join(dir, k.file), []byte(text), 0o600)
}

func writeKey(path string, key *ecdsa.PrivateKey) error {
	der, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return err
	}
	return writePEM(path, "EC PRIVATE KEY", der, 0o600)
}

func writePEM(path, kind string, der []byte, mode os.FileMode) error {
	return os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: kind, Bytes: der}), mode)
}

func serial() *big.Int {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		panic(err)
	}
	return n
}
