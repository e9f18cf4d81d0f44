//go:build race

package main

// raceDetector is true in a `go test -race` build, whose instrumentation allocates on
// its own schedule: allocation counts measured there are not the code's.
const raceDetector = true
