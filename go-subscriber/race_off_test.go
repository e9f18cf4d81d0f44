//go:build !race

package main

// raceDetector is false in an ordinary test build (see race_on_test.go).
const raceDetector = false
