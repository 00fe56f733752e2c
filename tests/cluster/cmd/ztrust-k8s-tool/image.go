package main

import (
	"archive/tar"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"
)

// The media types of the OCI image spec (https://github.com/opencontainers/image-spec), which
// containerd's `ctr images import` reads from an image layout archive.
const (
	mediaIndex    = "application/vnd.oci.image.index.v1+json"
	mediaManifest = "application/vnd.oci.image.manifest.v1+json"
	mediaConfig   = "application/vnd.oci.image.config.v1+json"
	mediaLayer    = "application/vnd.oci.image.layer.v1.tar"
)

// Every entry gets this time so that the same inputs give the same digests: importing an unchanged
// image again is then a no-op for containerd.
var epoch = time.Unix(0, 0).UTC()

type descriptor struct {
	MediaType   string            `json:"mediaType"`
	Digest      string            `json:"digest"`
	Size        int               `json:"size"`
	Annotations map[string]string `json:"annotations,omitempty"`
	Platform    *platform         `json:"platform,omitempty"`
}

type platform struct {
	Architecture string `json:"architecture"`
	OS           string `json:"os"`
}

// runImage writes a one-layer OCI image layout as a tar archive. The layer holds the files, symlinks
// and directories given; parents are added as needed.
func runImage(args []string) error {
	fs := flag.NewFlagSet("image", flag.ContinueOnError)
	name := fs.String("name", "", "image reference, e.g. ztrust.test/workload:1")
	out := fs.String("out", "", "the archive to write")
	user := fs.String("user", "", "config User")
	workdir := fs.String("workdir", "", "config WorkingDir")
	var files, symlinks, dirs, entrypoint, cmd, env multiFlag
	fs.Var(&files, "file", "SRC=DST: a file from the host, mode kept (repeatable)")
	fs.Var(&symlinks, "symlink", "LINK=TARGET (repeatable)")
	fs.Var(&dirs, "dir", "DIR or DIR=MODE (octal), e.g. /tmp=1777 (repeatable)")
	fs.Var(&entrypoint, "entrypoint", "one Entrypoint word (repeatable, in order)")
	fs.Var(&cmd, "cmd", "one Cmd word (repeatable, in order)")
	fs.Var(&env, "env", "KEY=VALUE (repeatable)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *name == "" || *out == "" {
		return errors.New("--name and --out are required")
	}

	layer, err := buildLayer(files, symlinks, dirs)
	if err != nil {
		return err
	}
	layerDigest := digest(layer)
	if len(env) == 0 {
		env = multiFlag{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
	}
	config, err := json.Marshal(map[string]any{
		"architecture": "amd64",
		"os":           "linux",
		"created":      epoch.Format(time.RFC3339),
		"config": map[string]any{
			"Entrypoint": []string(entrypoint),
			"Cmd":        []string(cmd),
			"Env":        []string(env),
			"User":       *user,
			"WorkingDir": *workdir,
		},
		"rootfs": map[string]any{"type": "layers", "diff_ids": []string{layerDigest}},
	})
	if err != nil {
		return err
	}
	manifest, err := json.Marshal(map[string]any{
		"schemaVersion": 2,
		"mediaType":     mediaManifest,
		"config":        descriptor{MediaType: mediaConfig, Digest: digest(config), Size: len(config)},
		"layers":        []descriptor{{MediaType: mediaLayer, Digest: layerDigest, Size: len(layer)}},
	})
	if err != nil {
		return err
	}
	tag := *name
	if i := strings.LastIndex(tag, ":"); i > strings.LastIndex(tag, "/") {
		tag = tag[i+1:]
	}
	index, err := json.Marshal(map[string]any{
		"schemaVersion": 2,
		"mediaType":     mediaIndex,
		"manifests": []descriptor{{
			MediaType: mediaManifest, Digest: digest(manifest), Size: len(manifest),
			// containerd names the imported image after io.containerd.image.name.
			Annotations: map[string]string{"io.containerd.image.name": *name, "org.opencontainers.image.ref.name": tag},
			Platform:    &platform{Architecture: "amd64", OS: "linux"},
		}},
	})
	if err != nil {
		return err
	}

	var archive bytes.Buffer
	tw := tar.NewWriter(&archive)
	entries := []struct {
		name string
		data []byte
	}{
		{"oci-layout", []byte(`{"imageLayoutVersion":"1.0.0"}`)},
		{"index.json", index},
		{"blobs/sha256/" + strings.TrimPrefix(digest(config), "sha256:"), config},
		{"blobs/sha256/" + strings.TrimPrefix(digest(manifest), "sha256:"), manifest},
		{"blobs/sha256/" + strings.TrimPrefix(layerDigest, "sha256:"), layer},
	}
	for _, d := range []string{"blobs/", "blobs/sha256/"} {
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: d, Mode: 0o755, ModTime: epoch}); err != nil {
			return err
		}
	}
	for _, e := range entries {
		if err := writeEntry(tw, e.name, e.data, 0o644); err != nil {
			return err
		}
	}
	if err := tw.Close(); err != nil {
		return err
	}
	tmp := *out + ".tmp"
	if err := os.WriteFile(tmp, archive.Bytes(), 0o644); err != nil {
		return err
	}
	return os.Rename(tmp, *out)
}

type layerEntry struct {
	typ    byte
	mode   int64
	src    string // a regular file's source on the host
	target string // a symlink's target
}

func buildLayer(files, symlinks, dirs []string) ([]byte, error) {
	entries := map[string]layerEntry{}
	addParents := func(p string) {
		for d := path.Dir(p); d != "/" && d != "."; d = path.Dir(d) {
			if _, ok := entries[d]; !ok {
				entries[d] = layerEntry{typ: tar.TypeDir, mode: 0o755}
			}
		}
	}
	for _, d := range dirs {
		p, modeText, _ := strings.Cut(d, "=")
		mode := int64(0o755)
		if modeText != "" {
			m, err := strconv.ParseInt(modeText, 8, 64)
			if err != nil {
				return nil, fmt.Errorf("--dir %s: %w", d, err)
			}
			mode = m
		}
		p = path.Clean("/" + p)
		addParents(p)
		entries[p] = layerEntry{typ: tar.TypeDir, mode: mode}
	}
	for _, f := range files {
		src, dst, ok := strings.Cut(f, "=")
		if !ok {
			return nil, fmt.Errorf("--file %q: want SRC=DST", f)
		}
		// Follow symlinks on the host (a library is usually a link to its versioned file): the image
		// gets the content under the name asked for.
		info, err := os.Stat(src)
		if err != nil {
			return nil, err
		}
		if !info.Mode().IsRegular() {
			return nil, fmt.Errorf("--file %s: not a regular file", src)
		}
		dst = path.Clean("/" + dst)
		addParents(dst)
		entries[dst] = layerEntry{typ: tar.TypeReg, mode: int64(info.Mode().Perm() & fs.ModePerm), src: src}
	}
	for _, s := range symlinks {
		link, target, ok := strings.Cut(s, "=")
		if !ok {
			return nil, fmt.Errorf("--symlink %q: want LINK=TARGET", s)
		}
		link = path.Clean("/" + link)
		addParents(link)
		entries[link] = layerEntry{typ: tar.TypeSymlink, mode: 0o777, target: target}
	}

	names := make([]string, 0, len(entries))
	for n := range entries {
		names = append(names, n)
	}
	// Sorted, so a parent directory precedes what it holds and the bytes are reproducible.
	sort.Strings(names)
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, n := range names {
		e := entries[n]
		rel := strings.TrimPrefix(n, "/")
		switch e.typ {
		case tar.TypeDir:
			if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: rel + "/", Mode: e.mode, ModTime: epoch}); err != nil {
				return nil, err
			}
		case tar.TypeSymlink:
			if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeSymlink, Name: rel, Linkname: e.target, Mode: e.mode, ModTime: epoch}); err != nil {
				return nil, err
			}
		case tar.TypeReg:
			data, err := os.ReadFile(filepath.Clean(e.src))
			if err != nil {
				return nil, err
			}
			if err := writeEntry(tw, rel, data, e.mode); err != nil {
				return nil, err
			}
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

func writeEntry(tw *tar.Writer, name string, data []byte, mode int64) error {
	if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: mode, Size: int64(len(data)), ModTime: epoch}); err != nil {
		return err
	}
	_, err := tw.Write(data)
	return err
}

func digest(b []byte) string {
	sum := sha256.Sum256(b)
	return "sha256:" + hex.EncodeToString(sum[:])
}
