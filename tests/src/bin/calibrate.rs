//! Measure this machine's guest speed for the test run named by
//! `MINIVMM_TEST_RUN` (see the harness's `calibrate` module); the harness
//! prints the result. `./test.sh` runs it before the suite, so that the one
//! calibration boot runs alone.

fn main() {
    if !std::path::Path::new("/dev/kvm").exists() {
        println!("calibration: SKIP, /dev/kvm is absent (VM tests will skip)");
        return;
    }
    tests::calibration();
}
