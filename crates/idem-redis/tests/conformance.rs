//! The shared store conformance suite against the real Redis named by `IDEM_TEST_REDIS_URL`
//! (under a key prefix of its own).

use idem_core::conformance::service_url;
use idem_redis::RedisStore;

async fn store() -> Option<RedisStore> {
    let url = service_url("IDEM_TEST_REDIS_URL")?;
    let separator = if url.contains('?') { '&' } else { '?' };
    Some(RedisStore::connect(&format!("{url}{separator}prefix=idem_conformance")).await.unwrap())
}

idem_core::store_conformance_tests!(store());
