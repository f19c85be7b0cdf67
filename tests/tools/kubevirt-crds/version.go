package main

// kubevirtVersion must match the kubevirt.io/kubevirt requirement in go.mod.
const kubevirtVersion = "v1.8.4"
