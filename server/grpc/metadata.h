#pragma once

// gRPC metadata keys of the moleserve API, shared by the server and its clients (molectl,
// molebench). No dependencies, so any client can include it.

namespace moleserve::server {

// Inference.Generate also takes the adapter name from this header, so that a load balancer can
// hash on it (deploy/nginx keeps each adapter on few replicas, where its experts stay hot). A
// request may set the header, GenerateRequest.adapter, or both when they agree; two different
// names are INVALID_ARGUMENT rather than a guess, since the balancer routed on the header. An
// empty value is the same as no header.
inline constexpr char kAdapterHeader[] = "x-moleserve-adapter";

}  // namespace moleserve::server
