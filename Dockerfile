# Build stage: compile the single static-ish binary (web/ is embedded into it).
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY web ./web
COPY benches ./benches
RUN cargo build --release --bin switchboard

# Run stage: just the binary.
FROM debian:bookworm-slim
RUN useradd --system --no-create-home switchboard
COPY --from=build /src/target/release/switchboard /usr/local/bin/switchboard
USER switchboard
EXPOSE 8080/tcp
EXPOSE 7882-7885/udp
ENTRYPOINT ["/usr/local/bin/switchboard"]
