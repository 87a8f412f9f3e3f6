//! A PostgreSQL database of its own for one test, on the server at `SWITCHYARD_TEST_PG`
//! (default `postgres://postgres@127.0.0.1:5432/test`); `None` (the test is skipped, and says
//! so) where no server answers, except under CI, where that fails the test.

pub fn server_url() -> String {
    std::env::var("SWITCHYARD_TEST_PG")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// A database of its own for one test, dropped (with its connections) when the test ends.
pub struct TestDb {
    name: String,
    /// The URL the engines use.
    pub url: String,
}

async fn admin() -> Option<tokio_postgres::Client> {
    let (client, conn) = tokio_postgres::connect(&server_url(), tokio_postgres::NoTls)
        .await
        .ok()?;
    tokio::spawn(conn);
    Some(client)
}

impl TestDb {
    /// `None` (the test is skipped) when no PostgreSQL server answers, outside CI.
    pub async fn new() -> Option<TestDb> {
        let Some(client) = admin().await else {
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!("no PostgreSQL server at {} (CI needs one)", server_url());
            }
            eprintln!(
                "postgres test skipped: no PostgreSQL server at {} (set SWITCHYARD_TEST_PG)",
                server_url()
            );
            return None;
        };
        let name = format!(
            "switchyard_test_{}_{:08x}",
            std::process::id(),
            rand::random::<u32>()
        );
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap();
        let base = server_url();
        let url = match base.rfind('/') {
            Some(i) if i > "postgres://".len() => format!("{}/{name}", &base[..i]),
            _ => format!("{base}/{name}"),
        };
        Some(TestDb { name, url })
    }

    pub async fn query_i64(&self, sql: &str) -> i64 {
        let (c, conn) = tokio_postgres::connect(&self.url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        c.query_one(sql, &[]).await.unwrap().get(0)
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                if let Some(c) = admin().await {
                    let _ = c
                        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .await;
                }
            });
        })
        .join();
    }
}
