// mimalloc: the server allocates and frees a 1 MiB buffer per streamed
// chunk on several threads; glibc's per-thread arenas page-fault on that
// pattern far more often (see the storage benchmark's CPU per GB).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    cargo_distbuild::cli::main()
}
